//! The PodDisruptionBudget: voluntary disruptions (node drains, upgrades) take one broker at a
//! time.

use super::{name_of, owned_meta, selector_labels};
use crate::crd::Instance;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub fn pod_disruption_budget(instance: &Instance) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: owned_meta(instance, name_of(instance).to_owned()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(instance)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::fixtures::instance;

    #[test]
    fn one_broker_at_a_time_may_be_disrupted() {
        let pdb = pod_disruption_budget(&instance("  replicas: 3\n"));
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            spec.selector.unwrap().match_labels.unwrap()["app.kubernetes.io/name"],
            "warren"
        );
    }
}
