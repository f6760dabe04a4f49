//! Status conditions as Kubernetes conventions want them: one per type, `lastTransitionTime`
//! moved only when the status flips, `observedGeneration` on each.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The object is as its spec says (declared in the broker, or the Instance's brokers ready).
pub const READY: &str = "Ready";
/// The operator applied the spec (the Instance's owned objects are written).
pub const RECONCILED: &str = "Reconciled";
/// The Instance's replica count is changing.
pub const SCALING: &str = "Scaling";

/// A condition of `type_` with the given truth, reason (CamelCase) and message.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Puts `new` in place of the condition of its type, keeping the old transition time when the
/// status did not change (a new reason or message is not a transition).
pub fn set(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            *old = new;
        }
        None => conditions.push(new),
    }
}

/// The condition of `type_`, if any.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn the_transition_time_moves_only_when_the_status_flips() {
        let mut cs = Vec::new();
        set(
            &mut cs,
            condition(READY, false, "Pending", "", Some(1), &at(10)),
        );
        set(
            &mut cs,
            condition(READY, false, "BrokerUnreachable", "x", Some(1), &at(20)),
        );
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].reason, "BrokerUnreachable");
        assert_eq!(cs[0].last_transition_time, at(10));
        set(
            &mut cs,
            condition(READY, true, "Declared", "", Some(2), &at(30)),
        );
        assert_eq!(cs[0].last_transition_time, at(30));
        assert_eq!(cs[0].observed_generation, Some(2));
        set(
            &mut cs,
            condition(RECONCILED, true, "Applied", "", Some(2), &at(40)),
        );
        assert_eq!(cs.len(), 2);
        assert_eq!(find(&cs, READY).unwrap().status, "True");
    }
}
