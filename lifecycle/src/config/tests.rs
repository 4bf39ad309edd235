use super::*;

fn error(yaml: &str) -> String {
    parse(yaml).unwrap_err().to_string()
}

const ENVOY_HTTP_FILTER: &str = r#"
name: envoy.filters.http.wasm
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
  config:
    name: "add_header"
    root_id: "add_header_root"
    configuration:
      "@type": "type.googleapis.com/google.protobuf.StringValue"
      value: |
        {"header": "x-added"}
    vm_config:
      vm_id: "my_vm"
      runtime: "envoy.wasm.runtime.v8"
      code:
        local:
          filename: "/etc/envoy/filter.wasm"
"#;

#[test]
fn an_envoy_http_filter_entry_loads_as_written() {
    let deployment = parse(ENVOY_HTTP_FILTER).unwrap();
    assert_eq!(deployment.http_filters.len(), 1);
    let plugin = &deployment.http_filters[0];
    assert_eq!(plugin.name, "add_header");
    assert_eq!(plugin.root_id, "add_header_root");
    assert_eq!(plugin.configuration, b"{\"header\": \"x-added\"}\n");
    assert_eq!(plugin.vm.vm_id, "my_vm");
    assert_eq!(plugin.vm.runtime, "envoy.wasm.runtime.v8");
    assert_eq!(
        plugin.vm.code,
        CodeSource::File("/etc/envoy/filter.wasm".into())
    );
    assert_eq!(plugin.failure_policy, FailurePolicy::FailClosed);
}

#[test]
fn a_typed_struct_carries_the_same_message() {
    let yaml = r#"
name: envoy.filters.http.wasm
typed_config:
  "@type": type.googleapis.com/udpa.type.v1.TypedStruct
  type_url: type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
  value:
    config:
      vm_config: {code: {local: {inline_string: "native_plugin"}}, runtime: envoy.wasm.runtime.null}
"#;
    let deployment = parse(yaml).unwrap();
    assert_eq!(
        deployment.http_filters[0].vm.code,
        CodeSource::String("native_plugin".into())
    );
}

#[test]
fn traffic_servers_files_load_with_their_camel_case_names() {
    let yaml = r#"
config:
  name: "ats_plugin"
  rootId: "root"
  configuration: |
    {"rules": []}
  capability_restriction_config:
    allowed_capabilities: [proxy_log, proxy_get_header_map_value]
  vmConfig:
    vmId: "vm"
    runtime: "ats.wasm.runtime.wamr"
    allow_precompiled: true
    environmentVariables: {hostEnvKeys: [HOME], keyValues: {MODE: test}}
    code:
      local:
        filename: "/usr/local/var/wasm/plugin.wasm"
"#;
    let plugin = &parse(yaml).unwrap().http_filters[0];
    assert_eq!(plugin.root_id, "root");
    assert_eq!(plugin.vm.vm_id, "vm");
    assert!(plugin.vm.allow_precompiled);
    assert_eq!(plugin.configuration, b"{\"rules\": []}\n");
    assert_eq!(
        plugin.allowed_capabilities.as_ref().map(|c| c.len()),
        Some(2)
    );
    assert_eq!(plugin.vm.environment.key_values["MODE"], "test");
}

#[test]
fn every_field_written_in_lower_camel_case_means_what_its_snake_case_name_means() {
    // Every field of Envoy's v3 messages the parser knows, in both spellings: one entry per
    // kind of plugin (and per kind of local code, as each plugin has one).
    let sha256 = "a".repeat(64);
    let camel = format!(
        r#"
- name: envoy.filters.http.wasm
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
    config:
      name: remote
      rootId: root
      configuration: {{"@type": type.googleapis.com/google.protobuf.StringValue, value: "{{}}"}}
      failurePolicy: FAIL_RELOAD
      reloadConfig: {{backoff: {{baseInterval: 2s, maxInterval: 30s}}}}
      capabilityRestrictionConfig: {{allowedCapabilities: {{proxy_log: {{}}, proxy_get_header_map_value: {{}}}}}}
      allowOnHeadersStopIteration: true
      vmConfig:
        vmId: vm
        runtime: envoy.wasm.runtime.v8
        configuration: vm settings
        allowPrecompiled: true
        nackOnCodeCacheMiss: true
        environmentVariables: {{hostEnvKeys: [HOME], keyValues: {{MODE: test}}}}
        code:
          remote:
            httpUri: {{uri: "https://example.com/plugin.wasm", cluster: code, timeout: 5s}}
            sha256: "{sha256}"
            retryPolicy: {{numRetries: 3, retryBackOff: {{baseInterval: 0.5s, maxInterval: 4s}}}}
- name: envoy.filters.network.wasm
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm
    config: {{name: tcp, failOpen: true, vmConfig: {{code: {{local: {{inlineBytes: AGFzbQEAAAA=}}}}}}}}
- name: envoy.bootstrap.wasm
  typedConfig:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    typeUrl: type.googleapis.com/envoy.extensions.wasm.v3.WasmService
    value:
      singleton: true
      config: {{name: service, vmConfig: {{runtime: envoy.wasm.runtime.null, code: {{local: {{inlineString: service}}}}}}}}
- {{config: {{name: env, vmConfig: {{code: {{local: {{environmentVariable: PLUGIN_WASM}}}}}}}}}}
"#
    );
    let snake = format!(
        r#"
- name: envoy.filters.http.wasm
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
    config:
      name: remote
      root_id: root
      configuration: {{"@type": type.googleapis.com/google.protobuf.StringValue, value: "{{}}"}}
      failure_policy: FAIL_RELOAD
      reload_config: {{backoff: {{base_interval: 2s, max_interval: 30s}}}}
      capability_restriction_config: {{allowed_capabilities: {{proxy_log: {{}}, proxy_get_header_map_value: {{}}}}}}
      allow_on_headers_stop_iteration: true
      vm_config:
        vm_id: vm
        runtime: envoy.wasm.runtime.v8
        configuration: vm settings
        allow_precompiled: true
        nack_on_code_cache_miss: true
        environment_variables: {{host_env_keys: [HOME], key_values: {{MODE: test}}}}
        code:
          remote:
            http_uri: {{uri: "https://example.com/plugin.wasm", cluster: code, timeout: 5s}}
            sha256: "{sha256}"
            retry_policy: {{num_retries: 3, retry_back_off: {{base_interval: 0.5s, max_interval: 4s}}}}
- name: envoy.filters.network.wasm
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm
    config: {{name: tcp, fail_open: true, vm_config: {{code: {{local: {{inline_bytes: AGFzbQEAAAA=}}}}}}}}
- name: envoy.bootstrap.wasm
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/envoy.extensions.wasm.v3.WasmService
    value:
      singleton: true
      config: {{name: service, vm_config: {{runtime: envoy.wasm.runtime.null, code: {{local: {{inline_string: service}}}}}}}}
- {{config: {{name: env, vm_config: {{code: {{local: {{environment_variable: PLUGIN_WASM}}}}}}}}}}
"#
    );
    let mut camel = parse(&camel).unwrap();
    let snake = parse(&snake).unwrap();
    // Only the paths differ: they name the fields as written, for messages (HTTP filters
    // first, then network filters, then services).
    let paths: Vec<&str> = camel.plugins().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "[0].typedConfig.config",
            "[3].config",
            "[1].typedConfig.config",
            "[2].typedConfig.value.config",
        ]
    );
    let plugins = camel
        .http_filters
        .iter_mut()
        .chain(&mut camel.network_filters)
        .chain(camel.services.iter_mut().map(|s| &mut s.plugin));
    for plugin in plugins {
        plugin.path = plugin.path.replace("typedConfig", "typed_config");
    }
    assert_eq!(camel, snake);

    // And the fields were read, not left at their defaults in both.
    let remote = &camel.http_filters[0];
    assert_eq!(remote.root_id, "root");
    assert_eq!(
        remote.failure_policy,
        FailurePolicy::FailReload {
            base_interval: Duration::from_secs(2),
            max_interval: Duration::from_secs(30)
        }
    );
    assert_eq!(
        remote.allowed_capabilities.as_ref().map(|c| c.len()),
        Some(2)
    );
    assert!(remote.allow_on_headers_stop_iteration);
    assert_eq!(remote.vm.vm_id, "vm");
    assert_eq!(remote.vm.configuration, b"vm settings");
    assert!(remote.vm.allow_precompiled && remote.vm.nack_on_code_cache_miss);
    assert_eq!(remote.vm.environment.host_env_keys, ["HOME"]);
    assert_eq!(remote.vm.environment.key_values["MODE"], "test");
    assert_eq!(
        remote.vm.code,
        CodeSource::Remote(RemoteCode {
            uri: "https://example.com/plugin.wasm".into(),
            cluster: Some("code".into()),
            timeout: Duration::from_secs(5),
            sha256,
            retries: 3,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(4),
        })
    );
    assert_eq!(
        camel.network_filters[0].failure_policy,
        FailurePolicy::FailOpen
    );
    assert_eq!(
        camel.network_filters[0].vm.code,
        CodeSource::Bytes(b"\0asm\x01\0\0\0".to_vec())
    );
    assert!(camel.services[0].singleton);
    assert_eq!(
        camel.services[0].plugin.vm.code,
        CodeSource::String("service".into())
    );
    assert_eq!(
        camel.http_filters[1].vm.code,
        CodeSource::EnvironmentVariable("PLUGIN_WASM".into())
    );
}

#[test]
fn a_list_is_a_chain_in_order_with_network_filters_and_services() {
    let yaml = r#"
- {vm_config: {code: {local: {filename: a.wasm}}}, name: first}
- name: envoy.filters.network.wasm
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm
    config: {name: tcp, vm_config: {code: {local: {filename: b.wasm}}}}
- name: envoy.bootstrap.wasm
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.wasm.v3.WasmService
    singleton: true
    config: {name: service, vm_config: {code: {local: {filename: c.wasm}}}}
- {config: {name: second, vm_config: {code: {local: {filename: d.wasm}}}}}
"#;
    let deployment = parse(yaml).unwrap();
    let names: Vec<_> = deployment.http_filters.iter().map(|p| &p.name).collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(deployment.network_filters[0].name, "tcp");
    assert!(deployment.services[0].singleton);
    assert_eq!(deployment.services[0].plugin.name, "service");
}

#[test]
fn failure_policies_resolve_as_envoy_resolves_them() {
    let with = |fields: &str| {
        parse(&format!(
            "{{vm_config: {{code: {{local: {{filename: a.wasm}}}}}}, {fields}}}"
        ))
    };
    assert_eq!(
        with("fail_open: true").unwrap().http_filters[0].failure_policy,
        FailurePolicy::FailOpen
    );
    assert_eq!(
        with("failure_policy: UNSPECIFIED").unwrap().http_filters[0].failure_policy,
        FailurePolicy::FailClosed
    );
    assert_eq!(
        with("failure_policy: FAIL_RELOAD").unwrap().http_filters[0].failure_policy,
        FailurePolicy::FailReload {
            base_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(10)
        }
    );
    assert_eq!(
        with("failure_policy: FAIL_RELOAD, reload_config: {backoff: {base_interval: 0.5s, max_interval: 2s}}")
            .unwrap()
            .http_filters[0]
            .failure_policy,
        FailurePolicy::FailReload {
            base_interval: Duration::from_millis(500),
            max_interval: Duration::from_secs(2)
        }
    );
    assert_eq!(
        with("fail_open: true, failure_policy: FAIL_CLOSED")
            .unwrap_err()
            .to_string(),
        "fail_open: only one of fail_open or failure_policy can be set"
    );
}

#[test]
fn remote_code_takes_envoys_defaults() {
    let sha = "a".repeat(64);
    let yaml = format!(
        "vm_config: {{code: {{remote: {{http_uri: {{uri: \"http://127.0.0.1:1/x.wasm\", cluster: c, timeout: 5s}}, sha256: \"{sha}\"}}}}}}"
    );
    let deployment = parse(&yaml).unwrap();
    let CodeSource::Remote(remote) = &deployment.http_filters[0].vm.code else {
        panic!("remote code expected");
    };
    assert_eq!(remote.timeout, Duration::from_secs(5));
    assert_eq!(remote.retries, 1);
    assert_eq!(remote.backoff_base, Duration::from_secs(1));
    assert_eq!(remote.backoff_max, Duration::from_secs(10));
}

#[test]
fn every_error_names_the_field_path_and_the_problem() {
    let cases = [
        (
            "{vm_config: {runtme: v8, code: {local: {filename: a.wasm}}}}",
            "vm_config.runtme: unknown field",
        ),
        (
            "{vm_config: {code: {remote: {http_uri: {uri: \"http://h/x\", timeout: 1s}}}}}",
            "vm_config.code.remote.sha256: required",
        ),
        ("{name: x}", "vm_config: required"),
        (
            "{capability_restriction_config: {allowed_capabilities: {proxy_log: {}}}, \
             vm_config: {capability_restriction_config: {allowed_capabilities: [fd_write]}, \
             code: {local: {filename: a.wasm}}}}",
            "capability_restriction_config: differs from vm_config.capability_restriction_config",
        ),
        ("{vm_config: {}}", "vm_config.code: required"),
        (
            "{vm_config: {code: {}}}",
            "vm_config.code: one of local or remote is required",
        ),
        (
            "{vm_config: {code: {local: {filename: a, inline_string: b}}}}",
            "vm_config.code.local: exactly one of filename",
        ),
        (
            "{vm_config: {code: {local: {inline_bytes: \"!!\"}}}}",
            "vm_config.code.local.inline_bytes: not base64",
        ),
        (
            "{vm_config: {code: {remote: {http_uri: {uri: \"http://h/x\", timeout: 1s}, sha256: ABC}}}}",
            "vm_config.code.remote.sha256: 64 lowercase hexadecimal digits",
        ),
        (
            "{vm_config: {code: {remote: {http_uri: {uri: \"http://h/x\", timeout: 5}, sha256: x}}}}",
            "vm_config.code.remote.http_uri.timeout: invalid type",
        ),
        (
            "{vm_config: {code: {remote: {http_uri: {uri: \"http://h/x\", timeout: 1m}, sha256: x}}}}",
            "vm_config.code.remote.http_uri.timeout: \"1m\" is not a duration",
        ),
        (
            "{failure_policy: FAIL_SOMETIMES, vm_config: {code: {local: {filename: a}}}}",
            "failure_policy: unknown variant `FAIL_SOMETIMES`",
        ),
        (
            "{reload_config: {backoff: {}}, failure_policy: FAIL_RELOAD, vm_config: {code: {local: {filename: a}}}}",
            "reload_config.backoff.base_interval: required",
        ),
        (
            "{vm_config: {code: {local: {filename: a}}, environment_variables: {host_env_keys: [A], key_values: {A: b}}}}",
            "vm_config.environment_variables: key \"A\" is given twice",
        ),
        (
            "{configuration: {\"@type\": type.googleapis.com/my.Config, value: {}}, vm_config: {code: {local: {filename: a}}}}",
            "configuration: unsupported configuration type \"my.Config\"",
        ),
        (
            "{name: envoy.filters.http.lua, typed_config: {\"@type\": x}}",
            "name: unknown extension \"envoy.filters.http.lua\"",
        ),
        (
            "{name: envoy.filters.http.wasm, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm, config: {}}}",
            "typed_config.@type: envoy.filters.http.wasm takes type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        ),
        (
            "- {vm_config: {code: {local: {filename: a}}}}\n- {vm_config: {code: {local: {filename: a}}, vmid: x}}",
            "[1].vm_config.vmid: unknown field",
        ),
        ("", "the configuration is empty"),
        (
            "{name: envoy.filters.http.wasm, typed_config: {\"@type\": x}, typedConfig: {\"@type\": x}}",
            "typedConfig: duplicate field (also written typed_config)",
        ),
        (
            "{name: envoy.filters.http.wasm, typed_config: {\"@type\": type.googleapis.com/udpa.type.v1.TypedStruct, type_url: a, typeUrl: b}}",
            "typed_config.typeUrl: duplicate field (also written type_url)",
        ),
    ];
    for (yaml, expected) in cases {
        let message = error(yaml);
        assert!(
            message.starts_with(expected),
            "{yaml}\n  gave: {message}\n  expected: {expected}..."
        );
    }
}
