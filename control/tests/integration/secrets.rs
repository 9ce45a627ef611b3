//! Remote clusters from `istio/multiCluster=true` secrets joining and leaving at runtime, and
//! readiness that waits for every configured cluster.

use crate::support::apiserver::ApiServer;
use crate::support::control::{
    start_control, start_control_with_remote, start_control_with_remote_and,
};
use crate::support::objects::*;
use crate::support::{http_get, wait_for};
use eastwest_control::RemoteCluster;

const RATINGS: &str = "ratings.sample.svc.cluster.local";

async fn remote(network: &str, gateway_ip: &str, ratings_ip: &str) -> ApiServer {
    let s = ApiServer::start().await;
    s.apply("namespaces", namespace("istio-system", Some(network)));
    s.apply(
        "services",
        gateway_service("istio-system", "istio-eastwestgateway", gateway_ip),
    );
    s.apply("services", service("sample", "ratings", &[("http", 9080)]));
    s.apply(
        "endpointslices",
        slice(
            "sample",
            "ratings-1",
            "ratings",
            &[("http", 9080)],
            &[ready(ratings_ip)],
        ),
    );
    s
}

#[tokio::test]
async fn remote_secret_cluster_joins_changes_and_leaves_at_runtime() {
    let fra = ApiServer::start().await;
    fra.apply(
        "services",
        service("sample", "helloworld", &[("http", 5000)]),
    );
    let ash = remote("network2", "192.0.2.20", "10.2.0.1").await;
    let ash_moved = remote("network3", "192.0.2.30", "10.3.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.secret_namespace = Some("istio-system".into())
    })
    .await;
    wait_for("ready without secrets", || async {
        control.not_synced().is_empty()
    })
    .await;
    let table = || control.current_table("network1").unwrap_or_default();
    wait_for("first table", || async {
        table()
            .service("helloworld.sample.svc.cluster.local")
            .is_some()
    })
    .await;
    assert!(table().remote_services.is_empty());

    // Joins: the secret istioctl create-remote-secret writes for ash.
    fra.apply(
        "secrets",
        remote_secret("istio-system", "ash", &ash.kubeconfig("ash")),
    );
    wait_for("ash's services", || async {
        let t = table();
        t.remote_services
            .iter()
            .any(|r| r.hostname == RATINGS && r.network == "network2")
            && t.network_gateways
                .iter()
                .any(|g| g.address == "192.0.2.20:15443")
    })
    .await;
    wait_for("ready with ash", || async {
        control.not_synced().is_empty()
    })
    .await;

    // Changes: the secret now points at another API server (another network).
    fra.apply(
        "secrets",
        remote_secret("istio-system", "ash", &ash_moved.kubeconfig("ash")),
    );
    wait_for("ash moved", || async {
        let t = table();
        t.remote_services.iter().any(|r| r.network == "network3")
            && t.network_gateways
                .iter()
                .all(|g| g.address == "192.0.2.30:15443")
    })
    .await;

    // Leaves.
    fra.delete("secrets", "istio-system", "istio-remote-secret-ash");
    wait_for("ash gone", || async {
        let t = table();
        t.remote_services.is_empty() && t.network_gateways.is_empty()
    })
    .await;
    let (_, metrics) = http_get(control.admin_addr(), "/metrics").await;
    assert!(!metrics.contains("cluster=\"ash\""), "{metrics}");
}

/// RBAC cannot grant Secrets by label, so control's Role lists and watches every Secret of its
/// namespace; like istiod, it asks the API server for `istio/multiCluster=true` ones only
/// (deploy/README.md promises this). A kubeconfig in any other Secret is never used.
#[tokio::test]
async fn only_labelled_secrets_in_the_secret_namespace_are_remote_clusters() {
    let fra = ApiServer::start().await;
    let ash = remote("network2", "192.0.2.20", "10.2.0.1").await;
    let other = remote("network3", "192.0.2.30", "10.3.0.1").await;
    let mut unlabelled = remote_secret("istio-system", "unlabelled", &other.kubeconfig("x"));
    unlabelled["metadata"]["labels"] = serde_json::json!({"app": "something-else"});
    fra.apply("secrets", unlabelled);
    fra.apply(
        "secrets",
        remote_secret("default", "elsewhere", &other.kubeconfig("x")),
    );
    // Applied last: once its cluster is in the table, the two above were seen (or filtered).
    fra.apply(
        "secrets",
        remote_secret("istio-system", "ash", &ash.kubeconfig("ash")),
    );
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.secret_namespace = Some("istio-system".into())
    })
    .await;
    let table = || control.current_table("network1").unwrap_or_default();
    wait_for("ash's services, and ready", || async {
        table()
            .remote_services
            .iter()
            .any(|r| r.network == "network2")
            && control.not_synced().is_empty()
    })
    .await;
    assert!(
        table()
            .remote_services
            .iter()
            .all(|r| r.network == "network2"),
        "a cluster from an unlabelled or out-of-namespace Secret: {:?}",
        table().remote_services
    );
    let (_, metrics) = http_get(control.admin_addr(), "/metrics").await;
    assert!(
        !metrics.contains("cluster=\"unlabelled\"") && !metrics.contains("cluster=\"elsewhere\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn unusable_remote_secret_is_counted_and_skipped() {
    let fra = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.secret_namespace = Some("istio-system".into())
    })
    .await;
    fra.apply(
        "secrets",
        remote_secret("istio-system", "bad", "this: [is not a kubeconfig"),
    );
    wait_for("error counted", || async {
        let (_, m) = http_get(control.admin_addr(), "/metrics").await;
        m.contains("eastwest_control_remote_secret_errors_total 1")
    })
    .await;
    assert!(
        control.not_synced().is_empty(),
        "{:?}",
        control.not_synced()
    );
}

#[tokio::test]
async fn readiness_waits_for_every_cluster_and_names_the_missing_one() {
    let fra = ApiServer::start().await;
    let ash = remote("network2", "192.0.2.20", "10.2.0.1").await;
    ash.go_down().await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control_with_remote(&fra, &ash, dir.path()).await;
    wait_for("fra synced", || async {
        control.not_synced() == ["cluster ash".to_string()]
    })
    .await;
    let (status, body) = http_get(control.admin_addr(), "/healthz/ready").await;
    assert_eq!((status, body.as_str()), (503, "not synced: cluster ash\n"));
    assert!(
        control.current_table("network1").is_none(),
        "no partial table before sync"
    );

    ash.come_back().await;
    wait_for("ready", || async {
        http_get(control.admin_addr(), "/healthz/ready").await.0 == 200
    })
    .await;
    let t = control.current_table("network1").unwrap();
    assert_eq!(t.remote_services.len(), 1);
}

/// The `eastwest_control_cluster_synced` value of `cluster` in `/metrics`.
async fn cluster_synced(control: &eastwest_control::Control, cluster: &str) -> Option<String> {
    let (_, m) = http_get(control.admin_addr(), "/metrics").await;
    let prefix = format!("eastwest_control_cluster_synced{{cluster=\"{cluster}\",");
    m.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_string)
}

#[tokio::test]
async fn remote_clusters_that_never_sync_stop_holding_readiness_after_the_sync_timeout() {
    let fra = ApiServer::start().await;
    fra.apply(
        "services",
        service("sample", "helloworld", &[("http", 5000)]),
    );
    // ash (`--remote`) and bel (remote secret) are unreachable from the start.
    let ash = remote("network2", "192.0.2.20", "10.2.0.1").await;
    ash.go_down().await;
    let bel = remote("network3", "192.0.2.30", "10.3.0.1").await;
    bel.go_down().await;
    fra.apply(
        "secrets",
        remote_secret("istio-system", "bel", &bel.kubeconfig("bel")),
    );
    let dir = tempfile::tempdir().unwrap();
    let control = start_control_with_remote_and(&fra, &ash, dir.path(), |c| {
        c.secret_namespace = Some("istio-system".into());
        c.sync_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    wait_for("ready without ash and bel", || async {
        http_get(control.admin_addr(), "/healthz/ready").await == (200, "ready\n".to_string())
    })
    .await;
    // Still visibly unsynced.
    assert_eq!(cluster_synced(&control, "ash").await.as_deref(), Some("0"));
    assert_eq!(cluster_synced(&control, "bel").await.as_deref(), Some("0"));
    let t = control.current_table("network1").unwrap();
    assert!(t.service("helloworld.sample.svc.cluster.local").is_some());

    // Once reachable, they sync and their routes arrive.
    ash.come_back().await;
    bel.come_back().await;
    wait_for("ash and bel synced", || async {
        let t = control.current_table("network1").unwrap_or_default();
        cluster_synced(&control, "ash").await.as_deref() == Some("1")
            && cluster_synced(&control, "bel").await.as_deref() == Some("1")
            && t.remote_services.len() == 2
    })
    .await;
    assert!(control.not_synced().is_empty());
}

#[tokio::test]
async fn the_local_cluster_holds_readiness_past_the_sync_timeout() {
    let fra = ApiServer::start().await;
    fra.go_down().await;
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.secret_namespace = Some("istio-system".into());
        c.sync_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    // The secret list (read from fra) times out like a remote cluster; fra itself does not.
    wait_for("only fra holds readiness", || async {
        control.not_synced() == ["cluster fra".to_string()]
    })
    .await;
    // The publisher gave up waiting (the sync timeout passed), readiness did not.
    wait_for("table published after the sync timeout", || async {
        control.current_table("network1").is_some()
    })
    .await;
    let (status, body) = http_get(control.admin_addr(), "/healthz/ready").await;
    assert_eq!((status, body.as_str()), (503, "not synced: cluster fra\n"));
    let (_, m) = http_get(control.admin_addr(), "/metrics").await;
    assert!(
        m.contains("eastwest_control_remote_secrets_synced 0"),
        "{m}"
    );
}

#[tokio::test]
async fn secret_kubeconfigs_that_run_commands_or_read_files_are_refused() {
    let fra = ApiServer::start().await;
    let ash = remote("network2", "192.0.2.20", "10.2.0.1").await;
    let bel = remote("network3", "192.0.2.30", "10.3.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "test-token").unwrap();
    let with_user = |user: &str| {
        bel.kubeconfig("bel")
            .replace("    token: test-token\n", user)
    };
    // The operator's own `--remote` file may read files.
    let ash_kc = dir.path().join("ash.yaml");
    std::fs::write(
        &ash_kc,
        ash.kubeconfig("ash").replace(
            "    token: test-token\n",
            &format!("    tokenFile: {}\n", token_file.display()),
        ),
    )
    .unwrap();
    let control = start_control(&fra, dir.path(), |c| {
        c.remotes.push(RemoteCluster {
            name: "ash".into(),
            kubeconfig: ash_kc,
        });
        c.secret_namespace = Some("istio-system".into());
    })
    .await;
    wait_for("ready", || async { control.not_synced().is_empty() }).await;

    // An exec plugin that would leave a marker and hand out a token, and file references.
    let marker = dir.path().join("exec-ran");
    let plugin = dir.path().join("plugin.sh");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\ntouch {}\necho '{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\
             \"kind\":\"ExecCredential\",\"status\":{{\"token\":\"test-token\"}}}}'\n",
            marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let bad = [
        (
            "exec-c",
            with_user(&format!(
                "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      \
                 command: {}\n      interactiveMode: Never\n",
                plugin.display()
            )),
        ),
        (
            "provider-c",
            with_user("    auth-provider:\n      name: oidc\n      config: {id-token: x}\n"),
        ),
        (
            "tokenfile-c",
            with_user(&format!("    tokenFile: {}\n", token_file.display())),
        ),
        (
            "cafile-c",
            bel.kubeconfig("bel").replace(
                "    server:",
                &format!(
                    "    certificate-authority: {}\n    server:",
                    token_file.display()
                ),
            ),
        ),
    ];
    for (name, kc) in &bad {
        fra.apply("secrets", remote_secret("istio-system", name, kc));
    }
    // Other clusters are unaffected.
    fra.apply(
        "secrets",
        remote_secret("istio-system", "bel", &bel.kubeconfig("bel")),
    );
    wait_for("refusals counted, bel joined", || async {
        let (_, m) = http_get(control.admin_addr(), "/metrics").await;
        let t = control.current_table("network1").unwrap_or_default();
        m.contains("eastwest_control_remote_secret_errors_total 4")
            && t.remote_services.iter().any(|r| r.network == "network3")
            && t.remote_services.iter().any(|r| r.network == "network2")
    })
    .await;
    let (_, m) = http_get(control.admin_addr(), "/metrics").await;
    for (name, _) in &bad {
        assert!(!m.contains(&format!("cluster=\"{name}\"")), "{m}");
    }
    assert!(!marker.exists(), "the exec plugin ran");
    assert!(control.not_synced().is_empty());
}

#[tokio::test]
async fn a_remote_cluster_added_after_ready_does_not_take_readiness_away() {
    let fra = ApiServer::start().await;
    let bel = remote("network3", "192.0.2.30", "10.3.0.1").await;
    bel.go_down().await;
    let dir = tempfile::tempdir().unwrap();
    // The default (long) sync timeout: only the fix keeps readiness, not the timeout.
    let control = start_control(&fra, dir.path(), |c| {
        c.secret_namespace = Some("istio-system".into())
    })
    .await;
    wait_for("ready", || async {
        http_get(control.admin_addr(), "/healthz/ready").await == (200, "ready\n".to_string())
    })
    .await;

    // A new remote secret whose cluster cannot sync yet.
    fra.apply(
        "secrets",
        remote_secret("istio-system", "bel", &bel.kubeconfig("bel")),
    );
    wait_for("bel added, unsynced", || async {
        cluster_synced(&control, "bel").await.as_deref() == Some("0")
    })
    .await;
    let (status, body) = http_get(control.admin_addr(), "/healthz/ready").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert!(
        control.not_synced().is_empty(),
        "{:?}",
        control.not_synced()
    );

    // Once reachable it syncs and its routes arrive.
    bel.come_back().await;
    wait_for("bel synced and routed", || async {
        let t = control.current_table("network1").unwrap_or_default();
        cluster_synced(&control, "bel").await.as_deref() == Some("1")
            && t.remote_services.len() == 1
    })
    .await;
}
