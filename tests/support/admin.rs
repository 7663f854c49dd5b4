//! The admin listener in tests: a free port, and `[admin]` added to a
//! mesh site's connector.

use super::mesh::Mesh;
use std::os::unix::fs::PermissionsExt;

/// A port nothing listens on now (the OS's choice).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Adds `[admin]` to `site`'s connector: `listen` on `port`, a token file
/// holding `tokens` (lines `name scope secret`) with `mode`, the peers on
/// loopback at `peers`, and `more` keys.
pub fn enable_admin(
    mesh: &Mesh,
    site: &str,
    port: u16,
    tokens: &str,
    mode: u32,
    peers: &[u16],
    more: &str,
) {
    let file = mesh.connector(site).clone();
    let token_file = file.with_extension("tokens");
    std::fs::write(&token_file, tokens).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(mode)).unwrap();
    let peers: Vec<String> = peers
        .iter()
        .map(|p| format!("\"http://127.0.0.1:{p}\""))
        .collect();
    let mut toml = std::fs::read_to_string(&file).unwrap();
    toml.push_str(&format!(
        "\n[admin]\nlisten = \"127.0.0.1:{port}\"\ntokens_file = \"{}\"\npeers = [{}]\n{more}",
        token_file.display(),
        peers.join(", ")
    ));
    std::fs::write(&file, toml).unwrap();
}
