//! What render writes for the policy's `listener` and `upstream`, and what it refuses
//! (docs/policy.md, "Listener TLS" and "Reaching the function app").

use super::*;

const APP: &str = "contoso-fn.azurewebsites.net";

fn policy(rest: &str) -> String {
    format!(r#"{{"apis": [{{"name": "a", "path_prefix": "/a"}}]{rest}}}"#)
}

fn upstream(tls: &str) -> String {
    policy(&format!(
        r#", "upstream": {{"tls": {{"sni": "{APP}"{tls}}}}}"#
    ))
}

fn to_app(mut a: Args) -> Args {
    a.upstream = format!("{APP}:443");
    a
}

fn tls_listener(config: &Value) -> Value {
    let listeners = config["static_resources"]["listeners"].as_array().unwrap();
    let l = listeners
        .iter()
        .find(|l| l["name"] == "gateway_tls")
        .unwrap();
    l["filter_chains"][0]["transport_socket"]["typed_config"].clone()
}

fn tls_params(config: &Value) -> Value {
    tls_listener(config)["common_tls_context"]["tls_params"].clone()
}

/// The route of every listener (they are the same).
fn routes(config: &Value) -> Vec<Value> {
    let mut hcms = Vec::new();
    connection_managers(config, &mut hcms);
    hcms.iter()
        .map(|h| h["route_config"]["virtual_hosts"][0]["routes"][0]["route"].clone())
        .collect()
}

fn app_tls(config: &Value) -> Value {
    named_cluster(config, "function_app").unwrap()["transport_socket"].clone()
}

#[test]
fn the_tls_listener_takes_tls_1_2_up_when_the_policy_says_nothing() {
    for text in [POLICY.to_string(), policy(r#", "listener": {"tls": {}}"#)] {
        let config = render_policy(&args(true, None), &text).unwrap();
        assert_eq!(
            tls_params(&config),
            json!({ "tls_minimum_protocol_version": "TLSv1_2" })
        );
    }
}

#[test]
fn listener_tls_sets_the_minimum_version_and_the_cipher_suites() {
    let text = policy(r#", "listener": {"tls": {"min_version": "1.3"}}"#);
    let config = render_policy(&args(true, None), &text).unwrap();
    assert_eq!(
        tls_params(&config),
        json!({ "tls_minimum_protocol_version": "TLSv1_3" })
    );
    let text = policy(
        r#", "listener": {"tls": {"cipher_suites":
            ["ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256"]}}"#,
    );
    let config = render_policy(&args(true, None), &text).unwrap();
    assert_eq!(
        tls_params(&config),
        json!({
            "tls_minimum_protocol_version": "TLSv1_2",
            "cipher_suites": ["ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256"]
        })
    );
    // The rest of the listener is as before: a client certificate asked for, not required.
    let listener = tls_listener(&config);
    assert_eq!(listener["require_client_certificate"], false);
    assert_eq!(
        listener["common_tls_context"]["tls_certificates"],
        json!([{ "certificate_chain": { "filename": "server.pem" },
                 "private_key": { "filename": "server.key" } }])
    );
}

#[test]
fn listener_tls_without_a_tls_listener_is_refused() {
    let text = policy(r#", "listener": {"tls": {"min_version": "1.3"}}"#);
    assert_eq!(
        refusal(&args(false, None), &text),
        "the policy sets listener.tls, for the TLS listener, which render writes only with \
         --tls-cert and --tls-key: give them, or remove listener.tls"
    );
    // An empty `listener` says nothing about TLS.
    render_policy(&args(false, None), &policy(r#", "listener": {}"#)).unwrap();
}

#[test]
fn a_listener_certificate_needs_its_key_and_the_key_its_certificate() {
    let mut a = args(true, None);
    a.tls_key = None;
    assert_eq!(
        refusal(&a, POLICY),
        "--tls-cert needs --tls-key (its private key)"
    );
    let mut a = args(true, None);
    a.tls_cert = None;
    assert_eq!(
        refusal(&a, POLICY),
        "--tls-key needs --tls-cert (its certificate)"
    );
}

#[test]
fn upstream_tls_is_sni_a_verified_server_and_the_apps_host() {
    let config = render_policy(&to_app(args(true, None)), &upstream("")).unwrap();
    let c = named_cluster(&config, "function_app").unwrap();
    assert_eq!(c["type"], "LOGICAL_DNS");
    assert_eq!(
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"],
        json!({ "socket_address": { "address": APP, "port_value": 443 } })
    );
    assert_eq!(
        app_tls(&config),
        json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": APP,
                "common_tls_context": {
                    "tls_params": {
                        "tls_minimum_protocol_version": "TLSv1_2",
                        "tls_maximum_protocol_version": "TLSv1_3"
                    },
                    "validation_context": {
                        "trusted_ca": { "filename": "/etc/ssl/certs/ca-certificates.crt" },
                        "match_typed_subject_alt_names": [
                            { "san_type": "DNS", "matcher": { "exact": APP } }
                        ]
                    }
                }
            }
        })
    );
    let routes = routes(&config);
    assert_eq!(routes.len(), 2);
    for route in routes {
        assert_eq!(
            route,
            json!({ "cluster": "function_app", "host_rewrite_literal": APP })
        );
    }
}

#[test]
fn upstream_tls_by_address_keeps_the_names_of_the_policy() {
    // A private endpoint's IP: the SNI, the verified name and the Host stay the app's.
    let mut a = args(false, None);
    a.upstream = "10.1.2.3:443".into();
    let config = render_policy(&a, &upstream("")).unwrap();
    let c = named_cluster(&config, "function_app").unwrap();
    assert_eq!(c["type"], "STATIC");
    assert_eq!(app_tls(&config)["typed_config"]["sni"], APP);
    assert_eq!(routes(&config)[0]["host_rewrite_literal"], APP);
}

#[test]
fn upstream_tls_fields_are_rendered() {
    let text = upstream(
        r#", "host_rewrite": "api.contoso.com", "ca_file": "/etc/envoy/app-ca.pem",
           "min_version": "1.3",
           "client_certificate": {"cert_file": "/etc/envoy/tls/gw.crt",
                                  "key_file": "/etc/envoy/tls/gw.key"}"#,
    );
    let config = render_policy(&to_app(args(false, None)), &text).unwrap();
    let context = &app_tls(&config)["typed_config"]["common_tls_context"];
    assert_eq!(
        context["tls_params"],
        json!({ "tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3" })
    );
    assert_eq!(
        context["validation_context"]["trusted_ca"]["filename"],
        "/etc/envoy/app-ca.pem"
    );
    // The certificate must still name the SNI, whatever Host is sent.
    assert_eq!(
        context["validation_context"]["match_typed_subject_alt_names"],
        json!([{ "san_type": "DNS", "matcher": { "exact": APP } }])
    );
    assert_eq!(
        context["tls_certificates"],
        json!([{ "certificate_chain": { "filename": "/etc/envoy/tls/gw.crt" },
                 "private_key": { "filename": "/etc/envoy/tls/gw.key" } }])
    );
    assert!(context.get("tls_certificate_sds_secret_configs").is_none());
    assert_eq!(
        routes(&config)[0]["host_rewrite_literal"],
        "api.contoso.com"
    );
}

#[test]
fn an_sds_client_certificate_is_read_from_its_file_and_reloaded_from_its_directory() {
    let text = upstream(
        r#", "client_certificate": {"sds": {"path": "/etc/envoy/sds/gateway-client.yaml",
                                             "secret": "gateway_client"}}"#,
    );
    let config = render_policy(&to_app(args(false, None)), &text).unwrap();
    let context = &app_tls(&config)["typed_config"]["common_tls_context"];
    assert_eq!(
        context["tls_certificate_sds_secret_configs"],
        json!([{
            "name": "gateway_client",
            "sds_config": {
                "path_config_source": {
                    "path": "/etc/envoy/sds/gateway-client.yaml",
                    "watched_directory": { "path": "/etc/envoy/sds" }
                },
                "resource_api_version": "V3"
            }
        }])
    );
    assert!(context.get("tls_certificates").is_none());
    // Envoy subscribes to a file only with a node identity.
    assert_eq!(
        config["node"],
        json!({ "id": "gateguard", "cluster": "gateguard" })
    );
    let files =
        upstream(r#", "client_certificate": {"cert_file": "/c.pem", "key_file": "/c.key"}"#);
    let config = render_policy(&to_app(args(false, None)), &files).unwrap();
    assert!(config.get("node").is_none());
}

#[test]
fn host_rewrite_false_sends_the_clients_host() {
    let config = render_policy(
        &to_app(args(true, None)),
        &upstream(r#", "host_rewrite": false"#),
    )
    .unwrap();
    for route in routes(&config) {
        assert_eq!(route, json!({ "cluster": "function_app" }));
    }
    assert_eq!(app_tls(&config)["typed_config"]["sni"], APP);
}

#[test]
fn without_upstream_tls_the_function_app_gets_plain_http_and_the_clients_host() {
    for text in [POLICY.to_string(), policy(r#", "upstream": {}"#)] {
        let config = render_policy(&args(true, None), &text).unwrap();
        assert!(named_cluster(&config, "function_app")
            .unwrap()
            .get("transport_socket")
            .is_none());
        for route in routes(&config) {
            assert_eq!(route, json!({ "cluster": "function_app" }));
        }
    }
}

#[test]
fn https_port_without_tls_and_http_port_with_tls_are_refused() {
    let mut a = args(false, None);
    a.upstream = format!("{APP}:443");
    for text in [POLICY.to_string(), policy(r#", "upstream": {}"#)] {
        let e = refusal(&a, &text);
        assert!(
            e.starts_with(&format!(
                "--upstream {APP}:443: port 443 is HTTPS's, and the policy has no upstream.tls"
            )),
            "{e}"
        );
    }
    a.upstream = format!("{APP}:80");
    let e = refusal(&a, &upstream(""));
    assert!(
        e.starts_with(&format!("--upstream {APP}:80: port 80 is plain HTTP's")),
        "{e}"
    );
    // Other ports are the deployment's business, both ways.
    for port in [8443, 8080] {
        a.upstream = format!("{APP}:{port}");
        render_policy(&a, &upstream("")).unwrap();
        render_policy(&a, POLICY).unwrap();
    }
}

#[test]
fn upstream_sni_stands_for_upstream_tls_sni() {
    let mut a = to_app(args(true, None));
    a.upstream_sni = Some(APP.into());
    let by_flag = render_policy(&a, POLICY).unwrap();
    let by_policy = render_policy(&to_app(args(true, None)), &upstream("")).unwrap();
    assert_eq!(
        named_cluster(&by_flag, "function_app"),
        named_cluster(&by_policy, "function_app")
    );
    assert_eq!(routes(&by_flag), routes(&by_policy));
}

#[test]
fn upstream_sni_with_upstream_tls_or_not_a_host_name_is_refused() {
    let mut a = to_app(args(false, None));
    a.upstream_sni = Some(APP.into());
    assert_eq!(
        refusal(&a, &upstream("")),
        format!(
            "--upstream-sni and the policy's upstream.tls (sni \"{APP}\") both say how to reach \
             the function app: remove --upstream-sni, the policy says it"
        )
    );
    a.upstream_sni = Some("https://contoso-fn.azurewebsites.net".into());
    let e = refusal(&a, POLICY);
    assert!(
        e.starts_with(
            "--upstream-sni: \"https://contoso-fn.azurewebsites.net\" is not a host name"
        ),
        "{e}"
    );
}

#[test]
fn jwks_clusters_are_not_the_function_apps() {
    // The policy's upstream.tls is the function app's only: a JWKS cluster keeps its own SNI,
    // the system CAs and no client certificate.
    let text = format!(
        r#"{{"apis": [{{"name": "a", "path_prefix": "/a", "jwt": {{"issuers": ["https://idp/"],
            "audiences": ["api://a"], "algorithms": ["RS256"],
            "jwks": {{"cluster": "idp", "uri": "https://idp.example/keys"}}}}}}],
            "upstream": {{"tls": {{"sni": "{APP}", "ca_file": "/etc/envoy/app-ca.pem",
              "client_certificate": {{"cert_file": "/c.pem", "key_file": "/c.key"}}}}}}}}"#
    );
    let config = render_policy(&to_app(args(false, None)), &text).unwrap();
    let idp = named_cluster(&config, "idp").unwrap()["transport_socket"]["typed_config"].clone();
    assert_eq!(idp["sni"], "idp.example");
    assert_eq!(
        idp["common_tls_context"],
        json!({ "validation_context": {
            "trusted_ca": { "filename": "/etc/ssl/certs/ca-certificates.crt" },
            "match_typed_subject_alt_names": [
                { "san_type": "DNS", "matcher": { "exact": "idp.example" } }
            ] } })
    );
}

#[test]
fn filter_only_refuses_a_policy_that_changes_listener_or_upstream() {
    let dir = std::env::temp_dir().join(format!("gateguard-render-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let compiled = |text: &str| gateguard_core::parse_policy(text.as_bytes(), &|_| None).unwrap();
    let running =
        upstream(r#", "client_certificate": {"cert_file": "/c.pem", "key_file": "/c.key"}"#);
    // Nothing rendered yet: nothing to compare.
    check_deploy_unchanged(&dir, &compiled(&running)).unwrap();
    write_filter_file(&args(false, Some(dir.clone())), &dir, &running, false).unwrap();

    // The same settings, written differently (defaults spelled out, another API), pass.
    let same = format!(
        r#"{{"apis": [{{"name": "b", "path_prefix": "/b"}}],
            "upstream": {{"tls": {{"sni": "{}", "host_rewrite": true, "min_version": "1.2",
              "ca_file": "/etc/ssl/certs/ca-certificates.crt",
              "client_certificate": {{"key_file": "/c.key", "cert_file": "/c.pem"}}}}}},
            "listener": {{}}}}"#,
        APP.to_uppercase()
    );
    check_deploy_unchanged(&dir, &compiled(&same)).unwrap();

    for (changed, section) in [
        (upstream(""), "upstream"),
        (POLICY.to_string(), "upstream"),
        (
            upstream(
                r#", "host_rewrite": false, "client_certificate": {"cert_file": "/c.pem", "key_file": "/c.key"}"#,
            ),
            "upstream",
        ),
        (
            format!(
                r#"{{"apis": [{{"name": "a", "path_prefix": "/a"}}],
                    "upstream": {{"tls": {{"sni": "{APP}", "client_certificate":
                      {{"cert_file": "/c.pem", "key_file": "/c.key"}}}}}},
                    "listener": {{"tls": {{"min_version": "1.3"}}}}}}"#
            ),
            "listener",
        ),
    ] {
        let e = check_deploy_unchanged(&dir, &compiled(&changed)).unwrap_err();
        assert_eq!(
            e,
            format!(
                "the policy changes {section}, which is {} in envoy.yaml, not part of the filter \
                 --filter-only swaps: render the full configuration (without --filter-only) and \
                 restart Envoy",
                if section == "listener" {
                    "the TLS listener"
                } else {
                    "the function_app cluster"
                }
            )
        );
    }

    // A policy Envoy would refuse (hand-edited into the file) still tells its upstream...
    let broken = running.replace(r#""path_prefix": "/a""#, r#""path_prefix": "a""#);
    assert!(gateguard_core::parse_policy(broken.as_bytes(), &|_| None).is_err());
    write_filter_file(&args(false, Some(dir.clone())), &dir, &broken, false).unwrap();
    check_deploy_unchanged(&dir, &compiled(&running)).unwrap();
    check_deploy_unchanged(&dir, &compiled(&upstream(""))).unwrap_err();
    // ...and a file that is not a policy at all does not stand in the way of its repair.
    std::fs::write(dir.join(FILTER_FILE), "resources: [{}]\n").unwrap();
    check_deploy_unchanged(&dir, &compiled(&upstream(""))).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
