//! `wss://` and `https://` for the client: rustls on aws-lc-rs, trusting the system's CA
//! bundle plus the PEM file named by `SPACEGATE_CA_FILE` (a private CA, or a test
//! server's self-signed certificate).

use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Where the system keeps its CA bundle (Debian, and most distributions).
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// A PEM file of extra certificates to trust.
pub const CA_FILE_ENV: &str = "SPACEGATE_CA_FILE";

/// A byte stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The client configuration every connection of this process uses (built once: loading
/// the system bundle is the expensive part).
pub fn client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let extra = std::env::var_os(CA_FILE_ENV);
            for path in std::iter::once(std::ffi::OsString::from(SYSTEM_BUNDLE)).chain(extra) {
                if let Ok(certs) = CertificateDer::pem_file_iter(&path) {
                    for cert in certs.flatten() {
                        let _ = roots.add(cert);
                    }
                }
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("aws-lc-rs supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        })
        .clone()
}

/// A TCP connection to `addr` (host:port), wrapped in TLS for `host` when `tls`.
pub async fn connect(addr: &str, host: &str, tls: bool) -> std::io::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect(addr).await?;
    wrap(tcp, host, tls).await
}

/// `tcp` as is, or after a TLS handshake for `host`.
pub async fn wrap(tcp: TcpStream, host: &str, tls: bool) -> std::io::Result<Box<dyn Io>> {
    let _ = tcp.set_nodelay(true);
    if !tls {
        return Ok(Box::new(tcp));
    }
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let stream = tokio_rustls::TlsConnector::from(client_config())
        .connect(name, tcp)
        .await?;
    Ok(Box::new(stream))
}
