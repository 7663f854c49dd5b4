//! Three sites kept in sync: every change applied exactly once, in its
//! origin's order, conflicts resolved the same everywhere.

use crate::support::mesh::{Mesh, MeshOptions, upsert};
use std::collections::BTreeMap;
use std::time::Duration;

#[tokio::test]
async fn writes_at_every_site_reach_the_others_and_go_round() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let _sidecars = mesh.spawn_all();
    let mut written = BTreeMap::new();
    for (i, site) in mesh.sites().into_iter().enumerate() {
        let c = mesh.client(site).await;
        for k in 0..20 {
            upsert(&c, site, (i * 100 + k) as i32, k as i32).await;
        }
        written.insert(site, 20i64);
    }
    let total: i64 = written.values().sum();
    let foreign: BTreeMap<&str, i64> = written.keys().map(|s| (*s, total - written[s])).collect();
    mesh.wait_settled(&foreign, Duration::from_secs(60)).await;
    let paris = mesh.items("PARIS").await;
    assert_eq!(paris.len(), 60);
    for site in mesh.sites() {
        assert_eq!(mesh.items(site).await, paris, "{site} differs from PARIS");
    }
}
