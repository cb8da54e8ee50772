//! Mutual TLS between peers (rustls): every node presents a certificate
//! signed by the cluster's CA, and each side checks that the other's
//! certificate names the host it is configured as (a DNS name or an IP
//! address in the certificate's subject alternative names).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::ServerCertVerifier;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::server::danger::ClientCertVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::config::TlsFiles;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {message}")]
    File {
        /// Which file: certificate, key or CA.
        what: &'static str,
        /// Its path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the material (e.g. the key does not match the
    /// certificate).
    #[error("TLS setup: {0}")]
    Rustls(String),
}

/// Client and server sides of mutual TLS for one node.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
    /// Why the peers would refuse this node's own certificate, if they
    /// would (see [`Tls::warning`]).
    warning: Option<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

fn file_error(what: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(what, path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Loads the node's certificate and key and the cluster CA.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let chain = certs("certificate", &files.cert)?;
        // The key is checked as the secret file is: one every user can read
        // lets every user of this server act as this node.
        match crate::auth::read_private(&files.key) {
            Err(crate::auth::PrivateFile::WorldReadable) => {
                return Err(TlsError::File {
                    what: "private key",
                    path: files.key.display().to_string(),
                    message: format!(
                        "readable by every user; run `chmod 600 {}` (and chown it to the user \
                         cachecast runs as)",
                        files.key.display()
                    ),
                });
            }
            // Read errors are reported below, in the words of the PEM parser.
            Err(crate::auth::PrivateFile::Read(_)) | Ok(_) => {}
        }
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| file_error("private key", &files.key, e))?;
        let mut roots = RootCertStore::empty();
        for ca in certs("CA certificate", &files.ca)? {
            roots
                .add(ca)
                .map_err(|e| file_error("CA certificate", &files.ca, e))?;
        }
        let roots = Arc::new(roots);
        let rustls_err = |e: rustls::Error| TlsError::Rustls(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let warning = own_certificate_problem(files, &chain, &roots, verifier.as_ref());
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(rustls_err)?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(rustls_err)?;
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(client)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            warning,
        })
    }

    /// What the peers will hold against this node's own certificate,
    /// checked at load against the configured CA: expired or not yet
    /// valid, not issued by that CA (or the CA file holds no CA), or not
    /// allowed for both client and server use (each node is both). Peers
    /// check the host name against their own configuration, so that is not
    /// checked here.
    pub fn warning(&self) -> Option<&str> {
        self.warning.as_deref()
    }

    /// TLS over a dialed connection to `host` (the peer's configured host
    /// name or IP address, which its certificate must name).
    pub async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> std::io::Result<client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{host} cannot be checked against a certificate: {e}"),
            )
        })?;
        self.connector.connect(name, tcp).await
    }

    /// TLS over an accepted connection; the client's certificate is
    /// verified against the CA here, and its name later, once the peer has
    /// said who it is (`peer_is`).
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<server::TlsStream<TcpStream>> {
        self.acceptor.accept(tcp).await
    }
}

/// The client certificate of an accepted connection.
pub fn peer_certificate(stream: &server::TlsStream<TcpStream>) -> Option<CertificateDer<'static>> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
}

/// See [`Tls::warning`]; `chain` and `roots` as loaded from `files`.
fn own_certificate_problem(
    files: &TlsFiles,
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    client: &dyn ClientCertVerifier,
) -> Option<String> {
    let (leaf, intermediates) = chain.split_first()?;
    let now = UnixTime::now();
    let said = |e: rustls::Error| {
        format!(
            "the certificate {} will be refused by peers: {} (checked against the CA {})",
            files.cert.display(),
            in_words(&e),
            files.ca.display()
        )
    };
    if let Err(e) = client.verify_client_cert(leaf, intermediates, now) {
        return Some(said(e));
    }
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .ok()?;
    // A name no certificate holds: everything but the name is checked, and
    // "not valid for this name" is the one answer meaning the rest is fine.
    let probe = ServerName::try_from("name-check.cachecast.invalid").ok()?;
    match server.verify_server_cert(leaf, intermediates, &probe, &[], now) {
        Ok(_) => None,
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        )) => None,
        Err(e) => Some(said(e)),
    }
}

/// A certificate problem as the docs name it; rustls's own names
/// ("UnknownIssuer") mean little to an operator.
fn in_words(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(c) = e else {
        return e.to_string();
    };
    match c {
        C::UnknownIssuer => "not signed by the configured CA".into(),
        C::BadSignature => "its signature does not verify with the configured CA's key".into(),
        C::Expired | C::ExpiredContext { .. } => "expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet".into(),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "not allowed for both client and server use (extended key usage)".into()
        }
        C::BadEncoding => "not a well-formed certificate".into(),
        C::Revoked => "revoked".into(),
        _ => e.to_string(),
    }
}

/// Whether a certificate names `host` (a DNS name or an IP address).
pub fn names(cert: &CertificateDer<'_>, host: &str) -> bool {
    let Ok(name) = ServerName::try_from(host.to_string()) else {
        return false;
    };
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}
