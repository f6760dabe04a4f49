//! Users and authentication. Passwords are stored as RabbitMQ stores them
//! (`rabbit_password_hashing_sha256`: base64 of a 4-byte salt followed by
//! SHA-256(salt ++ password)), so definitions can move between RabbitMQ and Warren.

pub mod permissions;

pub use permissions::{Access, Permission};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub password_hash: String,
    pub tags: Vec<String>,
}

/// Why a login was refused. The client is only told "refused"; the log says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unsupported mechanism {0}")]
    Mechanism(String),
    #[error("malformed {0} response")]
    Malformed(&'static str),
    #[error("user '{0}' - invalid credentials")]
    InvalidCredentials(String),
    #[error("user '{0}' can only connect via localhost")]
    LoopbackOnly(String),
}

pub fn hash_password(password: &str) -> String {
    let salt: [u8; 4] = rand::random();
    hash_with_salt(&salt, password)
}

fn hash_with_salt(salt: &[u8], password: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&h.finalize());
    B64.encode(out)
}

pub fn check_password(hash: &str, password: &str) -> bool {
    match B64.decode(hash) {
        Ok(bytes) if bytes.len() == 4 + 32 => hash_with_salt(&bytes[..4], password) == hash,
        _ => false,
    }
}

/// Decodes a SASL response into user name and password.
pub fn decode_response(mechanism: &str, response: &[u8]) -> Result<(String, String), AuthError> {
    match mechanism {
        "PLAIN" => {
            // [authzid] NUL authcid NUL passwd
            let mut parts = response.split(|b| *b == 0);
            let (Some(_authz), Some(user), Some(pass), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(AuthError::Malformed("PLAIN"));
            };
            Ok((
                String::from_utf8_lossy(user).into_owned(),
                String::from_utf8_lossy(pass).into_owned(),
            ))
        }
        "AMQPLAIN" => {
            let fields = parse_amqplain(response).ok_or(AuthError::Malformed("AMQPLAIN"))?;
            let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            match (get("LOGIN"), get("PASSWORD")) {
                (Some(u), Some(p)) => Ok((u, p)),
                _ => Err(AuthError::Malformed("AMQPLAIN")),
            }
        }
        other => Err(AuthError::Mechanism(other.to_owned())),
    }
}

/// AMQPLAIN's response is a field table's entries without the table's length prefix; only
/// string values matter here.
fn parse_amqplain(mut b: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let klen = *b.first()? as usize;
        let key = b.get(1..1 + klen)?;
        b = &b[1 + klen..];
        let kind = *b.first()?;
        b = &b[1..];
        let value = match kind {
            b'S' => {
                let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
                let v = b.get(4..4 + len)?;
                b = &b[4 + len..];
                v
            }
            b's' => {
                let len = *b.first()? as usize;
                let v = b.get(1..1 + len)?;
                b = &b[1 + len..];
                v
            }
            _ => return None,
        };
        out.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    Some(out)
}

/// The user database.
#[derive(Debug)]
pub struct Users {
    users: RwLock<HashMap<String, User>>,
    /// user → vhost → permission.
    permissions: RwLock<HashMap<String, HashMap<String, std::sync::Arc<Permission>>>>,
    /// Bumped on every permission change, so that cached checks know to look again.
    generation: std::sync::atomic::AtomicU64,
    loopback_only: Vec<String>,
}

impl Users {
    pub fn new(loopback_only: Vec<String>) -> Self {
        Self {
            users: RwLock::new(HashMap::new()),
            permissions: RwLock::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
            loopback_only,
        }
    }

    pub fn put(&self, user: User) {
        self.users.write().insert(user.name.clone(), user);
        self.bump();
    }

    pub fn remove(&self, name: &str) -> Option<User> {
        let user = self.users.write().remove(name);
        self.permissions.write().remove(name);
        self.bump();
        user
    }

    pub fn list(&self) -> Vec<User> {
        let mut users: Vec<User> = self.users.read().values().cloned().collect();
        users.sort_by(|a, b| a.name.cmp(&b.name));
        users
    }

    pub fn is_empty(&self) -> bool {
        self.users.read().is_empty()
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Changes whenever users or permissions change.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set_permission(&self, user: &str, vhost: &str, permission: Permission) {
        self.permissions
            .write()
            .entry(user.to_owned())
            .or_default()
            .insert(vhost.to_owned(), std::sync::Arc::new(permission));
        self.bump();
    }

    pub fn clear_permission(&self, user: &str, vhost: &str) -> bool {
        let removed = self
            .permissions
            .write()
            .get_mut(user)
            .is_some_and(|m| m.remove(vhost).is_some());
        self.bump();
        removed
    }

    /// Removes every permission on `vhost` (the vhost was deleted).
    pub fn clear_vhost(&self, vhost: &str) {
        for m in self.permissions.write().values_mut() {
            m.remove(vhost);
        }
        self.bump();
    }

    pub fn permission(&self, user: &str, vhost: &str) -> Option<std::sync::Arc<Permission>> {
        self.permissions.read().get(user)?.get(vhost).cloned()
    }

    /// Every (user, vhost, permission), sorted.
    pub fn permissions(&self) -> Vec<(String, String, std::sync::Arc<Permission>)> {
        let mut all: Vec<_> = self
            .permissions
            .read()
            .iter()
            .flat_map(|(u, m)| m.iter().map(|(v, p)| (u.clone(), v.clone(), p.clone())))
            .collect();
        all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        all
    }

    /// Whether `user` may `access` the resource `name` in `vhost`.
    pub fn allowed(&self, user: &str, vhost: &str, access: Access, name: &str) -> bool {
        self.permissions
            .read()
            .get(user)
            .and_then(|m| m.get(vhost))
            .is_some_and(|p| p.allows(access, name))
    }

    pub fn get(&self, name: &str) -> Option<User> {
        self.users.read().get(name).cloned()
    }

    pub fn authenticate(
        &self,
        name: &str,
        password: &str,
        peer: IpAddr,
    ) -> Result<User, AuthError> {
        let user = self
            .get(name)
            .filter(|u| check_password(&u.password_hash, password))
            .ok_or_else(|| AuthError::InvalidCredentials(name.to_owned()))?;
        if self.loopback_only.iter().any(|u| u == name) && !is_loopback(peer) {
            return Err(AuthError::LoopbackOnly(name.to_owned()));
        }
        Ok(user)
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hashes_use_rabbitmq_sha256_scheme() {
        // Computed by RabbitMQ 3.10 (rabbitmqctl hash_password is salted; this one has the
        // salt 0x908dc60a): base64(salt ++ sha256(salt ++ "test12")).
        let h = hash_with_salt(&[0x90, 0x8d, 0xc6, 0x0a], "test12");
        assert!(check_password(&h, "test12"));
        assert!(!check_password(&h, "test13"));
        assert!(check_password(&hash_password("guest"), "guest"));
        assert!(!check_password("not base64!", "x"));
    }

    #[test]
    fn plain_and_amqplain_responses_decode() {
        assert_eq!(
            decode_response("PLAIN", b"\0guest\0secret").unwrap(),
            ("guest".into(), "secret".into())
        );
        assert!(decode_response("PLAIN", b"guest").is_err());
        let mut amqplain = Vec::new();
        for (k, v) in [("LOGIN", "u"), ("PASSWORD", "p")] {
            amqplain.push(k.len() as u8);
            amqplain.extend_from_slice(k.as_bytes());
            amqplain.push(b'S');
            amqplain.extend_from_slice(&(v.len() as u32).to_be_bytes());
            amqplain.extend_from_slice(v.as_bytes());
        }
        assert_eq!(
            decode_response("AMQPLAIN", &amqplain).unwrap(),
            ("u".into(), "p".into())
        );
        assert_eq!(
            decode_response("EXTERNAL", b""),
            Err(AuthError::Mechanism("EXTERNAL".into()))
        );
    }

    #[test]
    fn loopback_users_are_refused_from_other_addresses() {
        let users = Users::new(vec!["guest".into()]);
        users.put(User {
            name: "guest".into(),
            password_hash: hash_password("guest"),
            tags: vec![],
        });
        assert!(
            users
                .authenticate("guest", "guest", "127.0.0.1".parse().unwrap())
                .is_ok()
        );
        assert!(
            users
                .authenticate("guest", "guest", "::1".parse().unwrap())
                .is_ok()
        );
        assert_eq!(
            users.authenticate("guest", "guest", "10.1.2.3".parse().unwrap()),
            Err(AuthError::LoopbackOnly("guest".into()))
        );
        assert!(
            users
                .authenticate("guest", "nope", "127.0.0.1".parse().unwrap())
                .is_err()
        );
    }
}
