//! TLS on cluster links, on whenever the node has a certificate (`tls_cert_file` and
//! `tls_key_file`): every node of a cluster must then have one.
//!
//! The acceptor presents the node's certificate; the dialer checks it against `tls_ca_file`
//! when one is given (the chain only: nodes are dialed by whatever address the peers list
//! holds, which a certificate need not name), and without one takes any. The dialer presents
//! none: who a peer is stays proved by the cluster secret, both ways, and that proof is bound
//! to the TLS session (its exported keying material goes into the key of the handshake's
//! proofs): a machine in the middle, ending one TLS session on each side, cannot pass the
//! proofs of one to the other.

use crate::config::Config;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The label of the keying material a link's handshake is bound to (RFC 5705).
const BINDING_LABEL: &[u8] = b"EXPORTER-warren-cluster-link";
/// Bytes of keying material.
pub const BINDING_LEN: usize = 32;

/// The reading and writing halves of a link's connection, plain or TLS.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// A connection ready for the link's handshake: its halves and, on TLS, the keying material
/// its proofs are bound to.
pub struct Connection {
    pub reader: ReadHalf,
    pub writer: WriteHalf,
    pub binding: Option<[u8; BINDING_LEN]>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("tls", &self.binding.is_some())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A plain TCP connection.
    pub fn plain(stream: TcpStream) -> Self {
        let (reader, writer) = stream.into_split();
        Self {
            reader: Box::new(reader),
            writer: Box::new(writer),
            binding: None,
        }
    }
}

/// The TLS settings of a node's links.
#[derive(Clone)]
pub struct LinkTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls").finish_non_exhaustive()
    }
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

impl LinkTls {
    /// The links' TLS settings from the node's certificate, key and CA; `None` when the node
    /// has no certificate (links are then plain TCP).
    pub fn from_config(config: &Config) -> Result<Option<Self>, String> {
        let (Some(cert_file), Some(key_file)) = (&config.tls_cert_file, &config.tls_key_file)
        else {
            return Ok(None);
        };
        let certs = read_certs(cert_file)?;
        let key = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|e| format!("cannot read a private key from {}: {e}", key_file.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!(
                    "the certificate in {} and the key in {} do not make a TLS identity: {e}",
                    cert_file.display(),
                    key_file.display()
                )
            })?;
        let roots = match &config.tls_ca_file {
            Some(ca_file) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(ca_file)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("bad CA certificate in {}: {e}", ca_file.display()))?;
                }
                Some(roots)
            }
            None => None,
        };
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier { roots, provider }))
            .with_no_client_auth();
        Ok(Some(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        }))
    }

    /// The TLS session of a connection a peer made.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<Connection> {
        let tls = self.acceptor.accept(stream).await?;
        let binding = binding(tls.get_ref().1)?;
        let (reader, writer) = tokio::io::split(tls);
        Ok(Connection {
            reader: Box::new(reader),
            writer: Box::new(writer),
            binding: Some(binding),
        })
    }

    /// The TLS session of a connection this node made to `address` (`host:port`).
    pub async fn connect(&self, stream: TcpStream, address: &str) -> io::Result<Connection> {
        let host = address
            .rsplit_once(':')
            .map_or(address, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .unwrap_or_else(|_| ServerName::try_from("warren-node").expect("a DNS name"));
        let tls = self.connector.connect(name, stream).await?;
        let binding = binding(tls.get_ref().1)?;
        let (reader, writer) = tokio::io::split(tls);
        Ok(Connection {
            reader: Box::new(reader),
            writer: Box::new(writer),
            binding: Some(binding),
        })
    }
}

fn binding<D>(conn: &rustls::ConnectionCommon<D>) -> io::Result<[u8; BINDING_LEN]> {
    conn.export_keying_material([0u8; BINDING_LEN], BINDING_LABEL, None)
        .map_err(io::Error::other)
}

/// Checks a peer's certificate chain against the CA, when there is one, but not the name it
/// was dialed by; checks the handshake's signatures always.
#[derive(Debug)]
struct PeerVerifier {
    roots: Option<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
