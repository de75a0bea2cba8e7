//! Rendering for a container (docs/deploy.md): where Envoy finds the ECDS files when render ran
//! elsewhere (`--ecds-envoy-dir`), and the health check the listener answers (`--health-path`).

use super::*;

fn health(path: &str) -> Args {
    let mut a = args(true, None);
    a.health_path = Some(path.into());
    a
}

fn ecds_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gateguard-render-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config_source(config: &Value, slot: usize) -> Value {
    http_filters(config)[0][slot]["config_discovery"]["config_source"]["path_config_source"].clone()
}

#[test]
fn the_ecds_files_are_watched_where_envoy_sees_them() {
    let dir = ecds_dir("envoy-dir");
    let mut a = args(false, Some(dir.clone()));
    a.ecds_envoy_dir = Some("/etc/envoy/filter".into());
    let config = render_policy(&a, POLICY).unwrap();
    let source = config_source(&config, 0);
    assert_eq!(source["path"], "/etc/envoy/filter/gateguard-filter.yaml");
    assert_eq!(source["watched_directory"]["path"], "/etc/envoy/filter");
    // Nothing of the machine that ran render is left in the configuration.
    let text = serde_json::to_string(&config).unwrap();
    assert!(!text.contains(&dir.display().to_string()), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_an_envoy_dir_the_ecds_dir_is_made_absolute() {
    let dir = ecds_dir("local-dir");
    let config = render_policy(&args(false, Some(dir.clone())), POLICY).unwrap();
    let watched = config_source(&config, 0)["watched_directory"]["path"].clone();
    let expected = std::fs::canonicalize(&dir).unwrap();
    assert_eq!(watched, json!(expected.display().to_string()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_relative_envoy_dir_is_refused() {
    for bad in ["etc/envoy/filter", "./filter", "", "filter/"] {
        let mut a = args(false, Some(PathBuf::from("unused")));
        a.ecds_envoy_dir = Some(bad.into());
        let e = refusal(&a, POLICY);
        assert!(
            e.starts_with(&format!("--ecds-envoy-dir {bad:?}: give the absolute path")),
            "{bad}: {e}"
        );
    }
}

#[test]
fn the_health_check_comes_first_on_every_listener_and_never_passes_through() {
    let config = render_policy(&health("/healthz"), POLICY).unwrap();
    let chains = http_filters(&config);
    assert_eq!(chains.len(), 2, "the HTTP and the TLS listener");
    for filters in chains {
        assert_eq!(filters[0]["name"], "envoy.filters.http.health_check");
        let hc = &filters[0]["typed_config"];
        assert_eq!(hc["pass_through_mode"], false);
        assert_eq!(
            hc["headers"],
            json!([{ "name": ":path", "string_match": { "exact": "/healthz" } }])
        );
        assert_eq!(filters[1]["name"], "envoy.filters.http.wasm");
    }
}

#[test]
fn the_health_check_goes_before_jwt_authn_and_the_discovered_filter() {
    let dir = ecds_dir("health-ecds");
    let mut a = health("/ready");
    a.ecds_dir = Some(dir.clone());
    let config = render_policy(&a, POLICY).unwrap();
    let names: Vec<Value> = http_filters(&config)[0]
        .iter()
        .map(|f| f["name"].clone())
        .collect();
    assert_eq!(
        names,
        json!([
            "envoy.filters.http.health_check",
            "gateguard",
            "envoy.filters.http.router"
        ])
        .as_array()
        .unwrap()
        .clone()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_health_check_unless_asked() {
    let config = render_policy(&args(true, None), POLICY).unwrap();
    for filters in http_filters(&config) {
        assert!(filters
            .iter()
            .all(|f| f["name"] != "envoy.filters.http.health_check"));
    }
}

#[test]
fn a_health_path_normalization_would_change_is_refused() {
    for (bad, why) in [
        ("healthz", "must start with '/'"),
        ("/", "'/' would answer the gateway's root"),
        ("/healthz?probe=1", "'?' is not allowed"),
        ("/health%7a", "'%' is not allowed"),
        ("/health z", "' ' is not allowed"),
        ("/héalth", "'é' is not allowed"),
        ("/a//b", "empty, '.' or '..' segment"),
        ("/healthz/", "empty, '.' or '..' segment"),
        ("/a/../healthz", "empty, '.' or '..' segment"),
        ("/./healthz", "empty, '.' or '..' segment"),
        ("/healthz\\x", "'\\\\' is not allowed"),
    ] {
        let e = refusal(&health(bad), POLICY);
        assert!(
            e.starts_with(&format!("--health-path {bad:?}: ")) && e.contains(why),
            "{bad}: {e}"
        );
    }
    let long = format!("/{}", "a".repeat(HEALTH_PATH_MAX));
    assert!(refusal(&health(&long), POLICY).contains("longer than 128"));
    for good in [
        "/healthz",
        "/.well-known/ready",
        "/probe/live-1",
        "/~health",
    ] {
        assert!(render_policy(&health(good), POLICY).is_ok(), "{good}");
    }
}

#[test]
fn apis_covering_the_health_path_are_named() {
    let policy: Value = serde_json::from_str(
        r#"{"apis": [{"name": "root", "path_prefix": "/"}, {"name": "h", "path_prefix": "/Health"},
                     {"name": "other", "path_prefix": "/healthzz"}, {"name": "api", "path_prefix": "/api"}]}"#,
    )
    .unwrap();
    assert_eq!(apis_under_health_path(&policy, "/health/z"), ["root", "h"]);
    assert_eq!(apis_under_health_path(&policy, "/healthz"), ["root"]);
}
