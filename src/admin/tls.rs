//! TLS for the admin listener (`[admin] tls_cert`, `tls_key`): rustls on
//! ring, the certificate chain and key read from PEM files at start (a key
//! file others may read is refused, as a token file is).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take over its handshake.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// The server side of TLS, from the PEM files; errors name the file.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    super::auth::check_private(key, "admin.tls_key")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("admin.tls_cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("admin.tls_cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "admin.tls_cert {}: no certificate in it (PEM expected)",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("admin.tls_key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| format!("admin.tls_cert and admin.tls_key do not make a pair: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The CA certificates of `[admin] peers_ca`, for the requests to the
/// peers; errors name the file.
pub fn peer_roots(file: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let roots: Vec<ureq::tls::Certificate<'static>> = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("admin.peers_ca {}: {e}", file.display()))?
        .map(|c| c.map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("admin.peers_ca {}: {e}", file.display()))?;
    match roots.is_empty() {
        true => Err(format!(
            "admin.peers_ca {}: no certificate in it (PEM expected)",
            file.display()
        )),
        false => Ok(roots),
    }
}

/// A TCP listener whose connections speak TLS before HTTP.
pub struct TlsListener {
    pub tcp: TcpListener,
    pub acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = match self.tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "admin API: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match tokio::time::timeout(HANDSHAKE, self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => return (tls, addr),
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "admin API: a TLS handshake failed")
                }
                Err(_) => tracing::debug!(%addr, "admin API: a TLS handshake took too long"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
