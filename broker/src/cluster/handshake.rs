//! How two nodes make sure they belong to one cluster before anything else crosses their link.
//!
//! Both sides write a hello at once (protocol version, process instance, a fresh nonce, node
//! and cluster names) and read the other's. Then the side that dialed proves it knows the
//! cluster secret, with an HMAC over both nonces, both names and its role; the side that
//! accepted checks that proof before it sends its own. The secret never crosses the wire, a
//! recorded proof is useless on another link (the nonces differ), and since the accepting side
//! proves nothing to a dialer that has not proven itself, a stranger that dials two nodes
//! cannot get one to produce the proof the other expects. Each side decides alone and logs
//! why it refused. (A stranger in the path of a dial it can answer could still pass bytes
//! between two nodes; TLS between nodes closes that.) Pure functions over bytes: the link code
//! does the I/O.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Opens every hello: the protocol and its version. A peer speaking anything else (another
/// version, or not Warren at all) is refused before its other bytes are read.
pub const MAGIC: &[u8; 8] = b"WARREN\x00\x01";
/// Bytes of a nonce and of a proof.
pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;
/// Longest node or cluster name a hello carries.
pub const MAX_NAME: usize = 1024;
/// What the proof's HMAC covers first, so it cannot be mistaken for any other use of the key.
const PROOF_CONTEXT: &[u8] = b"warren cluster link proof v2";

/// Which end of a link a proof comes from: part of what it proves, so that the dialer's proof
/// can never pass for the acceptor's or the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

/// What a node says of itself when a link opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Random per process: a node that dials its own address meets its own instance.
    pub instance: u64,
    pub nonce: [u8; NONCE_LEN],
    pub node: String,
    /// The configured cluster name (empty when none is configured).
    pub cluster: String,
}

/// Why a link was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the peer does not speak this version of Warren's cluster protocol")]
    Protocol,
    #[error("malformed hello: {0}")]
    Malformed(&'static str),
    #[error("the peer is this node itself")]
    Itself,
    #[error("the peer claims to be this very process")]
    Impostor,
    #[error("the peer's cluster name {theirs:?} differs from this node's {ours:?}")]
    ClusterName { ours: String, theirs: String },
    #[error("the peer's node name {0:?} is this node's own")]
    SameName(String),
    #[error("the peer does not know this cluster's secret")]
    Secret,
}

impl Hello {
    /// The hello on the wire: magic, instance, nonce, then the two names, each after its
    /// length (two bytes, big-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(8 + 8 + NONCE_LEN + 4 + self.node.len() + self.cluster.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.instance.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        for name in [&self.node, &self.cluster] {
            let len = name.len().min(MAX_NAME);
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out.extend_from_slice(&name.as_bytes()[..len]);
        }
        out
    }

    /// Bytes of the fixed part of a hello, before the names.
    pub const FIXED: usize = 8 + 8 + NONCE_LEN;

    /// Reads the fixed part; the names follow, their lengths read one at a time by
    /// [`read_name_len`] so that a hostile peer cannot make the reader allocate much.
    pub fn decode_fixed(bytes: &[u8; Self::FIXED]) -> Result<(u64, [u8; NONCE_LEN]), Refusal> {
        if &bytes[..8] != MAGIC {
            return Err(Refusal::Protocol);
        }
        let instance = u64::from_be_bytes(bytes[8..16].try_into().expect("eight bytes"));
        let nonce = bytes[16..].try_into().expect("nonce bytes");
        Ok((instance, nonce))
    }

    /// Decodes a whole hello (tests, and peers whose bytes are all at hand).
    pub fn decode(bytes: &[u8]) -> Result<Self, Refusal> {
        if bytes.len() >= MAGIC.len() && &bytes[..MAGIC.len()] != MAGIC {
            return Err(Refusal::Protocol);
        }
        let fixed: &[u8; Self::FIXED] = bytes
            .get(..Self::FIXED)
            .and_then(|b| b.try_into().ok())
            .ok_or(Refusal::Malformed("short hello"))?;
        let (instance, nonce) = Self::decode_fixed(fixed)?;
        let mut rest = &bytes[Self::FIXED..];
        let mut names = Vec::with_capacity(2);
        for _ in 0..2 {
            let len = read_name_len(rest.get(..2).ok_or(Refusal::Malformed("short hello"))?)?;
            let name = rest
                .get(2..2 + len)
                .ok_or(Refusal::Malformed("short hello"))?;
            names.push(decode_name(name)?);
            rest = &rest[2 + len..];
        }
        let cluster = names.pop().expect("two names");
        let node = names.pop().expect("two names");
        Ok(Self {
            instance,
            nonce,
            node,
            cluster,
        })
    }
}

/// A name's length from its two-byte prefix, refusing lengths no hello carries.
pub fn read_name_len(prefix: &[u8]) -> Result<usize, Refusal> {
    let len = u16::from_be_bytes([prefix[0], prefix[1]]) as usize;
    if len > MAX_NAME {
        return Err(Refusal::Malformed("name too long"));
    }
    Ok(len)
}

pub fn decode_name(bytes: &[u8]) -> Result<String, Refusal> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Refusal::Malformed("name is not UTF-8"))
}

/// Whether the link may go on to the proofs: not a link to ourselves (the same process
/// instance), the same cluster name, not another node under our name.
pub fn admit(ours: &Hello, theirs: &Hello) -> Result<(), Refusal> {
    if theirs.instance == ours.instance {
        return Err(Refusal::Itself);
    }
    if theirs.cluster != ours.cluster {
        return Err(Refusal::ClusterName {
            ours: ours.cluster.clone(),
            theirs: theirs.cluster.clone(),
        });
    }
    if theirs.node == ours.node {
        return Err(Refusal::SameName(theirs.node.clone()));
    }
    Ok(())
}

/// The proof `sender` sends `receiver` from its end of the link: the HMAC, keyed with the
/// secret, of its role, both nonces (the receiver's makes it fresh) and both names (which bind
/// it to this pair).
pub fn proof(secret: &[u8], role: Role, sender: &Hello, receiver: &Hello) -> [u8; PROOF_LEN] {
    mac(secret, role, sender, receiver)
        .finalize()
        .into_bytes()
        .into()
}

/// The key of a link's proofs: the secret itself on plain TCP; on TLS, the secret bound to
/// the session's keying material (`binding`), so that a proof made for one session proves
/// nothing on another.
pub fn bound_key(secret: &[u8], binding: Option<&[u8]>) -> Vec<u8> {
    let Some(binding) = binding else {
        return secret.to_vec();
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(b"warren cluster link bound to a TLS session");
    mac.update(binding);
    mac.finalize().into_bytes().to_vec()
}

/// Checks, in constant time, the proof `sender` sent `receiver` from its end `role`.
pub fn verify(
    secret: &[u8],
    role: Role,
    sender: &Hello,
    receiver: &Hello,
    proof: &[u8; PROOF_LEN],
) -> Result<(), Refusal> {
    mac(secret, role, sender, receiver)
        .verify_slice(proof)
        .map_err(|_| Refusal::Secret)
}

fn mac(secret: &[u8], role: Role, sender: &Hello, receiver: &Hello) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(PROOF_CONTEXT);
    mac.update(match role {
        Role::Dialer => b"dialer",
        Role::Acceptor => b"accept",
    });
    mac.update(&receiver.nonce);
    mac.update(&sender.nonce);
    for name in [&sender.node, &receiver.node, &sender.cluster] {
        mac.update(&(name.len() as u64).to_be_bytes());
        mac.update(name.as_bytes());
    }
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(node: &str, cluster: &str, seed: u8) -> Hello {
        Hello {
            instance: u64::from(seed) * 7919,
            nonce: [seed; NONCE_LEN],
            node: node.into(),
            cluster: cluster.into(),
        }
    }

    #[test]
    fn hellos_round_trip() {
        let h = hello("warren@n1", "shop", 1);
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let unnamed = hello("warren@n1", "", 2);
        assert_eq!(Hello::decode(&unnamed.encode()).unwrap(), unnamed);
    }

    #[test]
    fn anything_but_a_hello_of_this_version_is_refused() {
        let mut bytes = hello("a", "c", 1).encode();
        bytes[7] = 2;
        assert_eq!(Hello::decode(&bytes), Err(Refusal::Protocol));
        assert_eq!(
            Hello::decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789abcdefghij"),
            Err(Refusal::Protocol)
        );
        let whole = hello("a", "c", 1).encode();
        for cut in [0, 10, Hello::FIXED, whole.len() - 1] {
            assert!(Hello::decode(&whole[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = whole[..Hello::FIXED].to_vec();
        long.extend_from_slice(&((MAX_NAME + 1) as u16).to_be_bytes());
        assert_eq!(
            Hello::decode(&long),
            Err(Refusal::Malformed("name too long"))
        );
    }

    #[test]
    fn the_same_secret_proves_and_another_does_not() {
        let a = hello("warren@a", "c", 1);
        let b = hello("warren@b", "c", 2);
        let p = proof(b"s3cret", Role::Dialer, &a, &b);
        assert_eq!(verify(b"s3cret", Role::Dialer, &a, &b, &p), Ok(()));
        assert_eq!(
            verify(b"other", Role::Dialer, &a, &b, &p),
            Err(Refusal::Secret)
        );
        // Bound to its sender, its role and this link's nonces: not replayable elsewhere.
        assert_eq!(
            verify(b"s3cret", Role::Dialer, &b, &a, &p),
            Err(Refusal::Secret)
        );
        assert_eq!(
            verify(b"s3cret", Role::Acceptor, &a, &b, &p),
            Err(Refusal::Secret)
        );
        let b_again = hello("warren@b", "c", 3);
        assert_eq!(
            verify(b"s3cret", Role::Dialer, &a, &b_again, &p),
            Err(Refusal::Secret)
        );
    }

    #[test]
    fn a_stranger_dialing_two_nodes_cannot_relay_one_proof_to_the_other() {
        // The stranger dials a and b and shows each the other's nonce under the other's name.
        // Only acceptors would answer it with a proof, and an acceptor proves only after the
        // dialer did; were it to, its proof is an acceptor's and names itself as sender.
        let a = hello("warren@a", "c", 1);
        let b = hello("warren@b", "c", 2);
        let as_b = Hello {
            instance: 99,
            ..b.clone()
        };
        let b_would_send_as_acceptor = proof(b"s", Role::Acceptor, &b, &a);
        assert_eq!(
            verify(b"s", Role::Dialer, &as_b, &a, &b_would_send_as_acceptor),
            Err(Refusal::Secret)
        );
    }

    #[test]
    fn admission_refuses_itself_another_cluster_and_a_duplicate_name() {
        let a = hello("warren@a", "c", 1);
        assert_eq!(admit(&a, &a.clone()), Err(Refusal::Itself));
        // The same process with another nonce (every connection has a fresh one): itself.
        let a_again = Hello {
            nonce: [9; NONCE_LEN],
            ..a.clone()
        };
        assert_eq!(admit(&a, &a_again), Err(Refusal::Itself));
        assert_eq!(
            admit(&a, &hello("warren@b", "d", 2)),
            Err(Refusal::ClusterName {
                ours: "c".into(),
                theirs: "d".into()
            })
        );
        assert_eq!(
            admit(&a, &hello("warren@a", "c", 2)),
            Err(Refusal::SameName("warren@a".into()))
        );
        assert_eq!(admit(&a, &hello("warren@b", "c", 2)), Ok(()));
    }
}
