//! The `pwhost run` command-line contract: output shape, inputs, exit codes and one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn plugin(name: &str) -> PathBuf {
    let path = root().join("plugins/dist").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `bash plugins/build.sh` first",
        path.display()
    );
    path
}

fn pwhost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pwhost"))
        .args(args)
        .output()
        .expect("pwhost runs")
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON report")
}

#[test]
fn without_a_scenario_it_runs_one_get_and_reports_json() {
    let plugin = plugin("rust/http_headers.wasm");
    let report = json(&pwhost(&["run", "--plugin", plugin.to_str().unwrap()]));
    assert_eq!(report["runtime"], default_engine());
    assert_eq!(report["abi_version"], "0.2.1");
    assert_eq!(report["vm_start"], true);
    assert_eq!(report["configure"], true);
    let http = report["http"].as_array().unwrap();
    assert_eq!(http.len(), 1);
    assert_eq!(
        http[0]["request_headers"][1],
        serde_json::json!([":path", "/"])
    );
    assert_eq!(http[0]["actions"]["request_headers"], "continue");
    assert_eq!(http[0]["stalled"], false);
    for key in ["logs", "metrics", "shared_data"] {
        assert!(report.get(key).is_some(), "{key} is part of the report");
    }
    assert_eq!(report["logs"][0]["context_id"], 2);
}

#[test]
fn configuration_comes_from_text_or_a_file_and_scenarios_from_yaml() {
    let directory = std::env::temp_dir().join(format!("pwhost-cli-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let config = directory.join("config.json");
    std::fs::write(&config, r#"{"header": "x-from-file", "value": "1"}"#).unwrap();
    let scenario = directory.join("scenario.yaml");
    std::fs::write(
        &scenario,
        "http:\n  - request_headers: [[\":path\", \"/a\"]]\n  - {}\n",
    )
    .unwrap();
    let plugin = plugin("rust/plugin_config.wasm");
    let report = json(&pwhost(&[
        "run",
        "--plugin",
        plugin.to_str().unwrap(),
        "--vm-config",
        "inline vm config",
        "--plugin-config",
        &format!("@{}", config.display()),
        "--scenario",
        scenario.to_str().unwrap(),
    ]));
    assert_eq!(report["http"].as_array().unwrap().len(), 2);
    assert_eq!(
        report["http"][0]["request_headers"],
        serde_json::json!([[":path", "/a"], ["x-from-file", "1"]])
    );
    assert_eq!(report["logs"][0]["message"], "vm config: inline vm config");
    std::fs::remove_dir_all(&directory).ok();
}

#[test]
fn the_text_format_is_for_people() {
    let plugin = plugin("rust/http_headers.wasm");
    let text = text_report(&["--plugin", plugin.to_str().unwrap()]);
    let runtime_line = format!("runtime {}", default_engine());
    assert!(text.contains(&runtime_line), "{text}");
    assert!(text.contains("> x-pwhost-plugin: http_headers"), "{text}");
}

/// The report of `pwhost run ARGS --format text`, which must succeed.
fn text_report(args: &[&str]) -> String {
    let output = pwhost(&[&["run"], args, &["--format", "text"]].concat());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The engine `pwhost run` picks for a WebAssembly plugin when none is named.
fn default_engine() -> &'static str {
    pwhost::runtimes::default_name().expect("an engine is compiled in")
}

/// A run that failed on its input: exit code 1 (2 is for a command line clap refused), and one
/// line on standard error naming `needle`.
fn assert_one_line_error(output: &Output, needle: &str) {
    assert_eq!(
        output.status.code(),
        Some(1),
        "should fail with 1: {output:?}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "{stderr} should mention {needle}");
}

#[test]
fn bad_inputs_fail_with_one_line_errors() {
    let malformed = plugin("wat/malformed.wasm");
    assert_one_line_error(
        &pwhost(&["run", "--plugin", malformed.to_str().unwrap()]),
        "invalid module",
    );
    let not_wasm = plugin("wat/not_wasm.wasm");
    assert_one_line_error(
        &pwhost(&["run", "--plugin", not_wasm.to_str().unwrap()]),
        "magic header",
    );
    let unknown_abi = plugin("wat/unknown_abi.wasm");
    assert_one_line_error(
        &pwhost(&["run", "--plugin", unknown_abi.to_str().unwrap()]),
        "proxy_abi_version_0_3_0",
    );
    assert_one_line_error(
        &pwhost(&["run", "--plugin", "/no/such/plugin.wasm"]),
        "cannot read plugin",
    );
    let good = plugin("wat/minimal.wasm");
    let good = good.to_str().unwrap();
    assert_one_line_error(
        &pwhost(&["run", "--plugin", good, "--scenario", "/no/such.yaml"]),
        "cannot read scenario",
    );
    assert_one_line_error(
        &pwhost(&["run", "--plugin", good, "--plugin-config", "@/no/such"]),
        "plugin configuration",
    );
    assert_one_line_error(
        &pwhost(&["run", "--plugin", good, "--runtime", "nonesuch"]),
        "nonesuch",
    );
    for command in ["run", "bench"] {
        assert_one_line_error(
            &pwhost(&[command, "--plugin", good, "--runtime", ""]),
            "--runtime: an empty engine name",
        );
    }
    let bad_scenario =
        std::env::temp_dir().join(format!("pwhost-bad-scenario-{}.yaml", std::process::id()));
    // An unknown field; counts past their limits, refused rather than run for hours, with the
    // field named.
    for (text, needle) in [
        ("http: [{request_headerz: []}]\n", "invalid scenario"),
        (
            "vms: 100000000\n",
            "vms: invalid value: integer `100000000`, expected a VM count from 1 to 256",
        ),
        (
            "vms: 0\n",
            "vms: invalid value: integer `0`, expected a VM count from 1 to 256",
        ),
        (
            "ticks: 4294967295\n",
            "ticks: invalid value: integer `4294967295`, expected a tick count from 0 to 100000",
        ),
        (
            "shutdown_ticks: 100001\n",
            "shutdown_ticks: invalid value: integer `100001`, expected a tick count from 0 to 100000",
        ),
        (
            "http: [{delay_ms: 60000}]\n",
            "http[0].delay_ms: invalid value: integer `60000`, expected a delay in milliseconds \
             from 0 to 10000",
        ),
        (
            "tcp: [{ticks_after: 4294967295}]\n",
            "tcp[0].ticks_after: invalid value: integer `4294967295`, expected a tick count",
        ),
    ] {
        std::fs::write(&bad_scenario, text).unwrap();
        assert_one_line_error(
            &pwhost(&[
                "run",
                "--plugin",
                good,
                "--scenario",
                bad_scenario.to_str().unwrap(),
            ]),
            needle,
        );
    }
    std::fs::remove_file(&bad_scenario).ok();
    // What is not a regular file is refused at once, not read until memory runs out (or, for a
    // FIFO, waited on for ever).
    let fifo = std::env::temp_dir().join(format!("pwhost-fifo-{}", std::process::id()));
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let fifo = fifo.to_str().unwrap();
    for (args, needle) in [
        (vec!["--scenario", "/dev/zero"], "cannot read scenario"),
        (vec!["--scenario", fifo], "cannot read scenario"),
        (
            vec!["--plugin-config", "@/dev/zero"],
            "plugin configuration",
        ),
    ] {
        let mut all = vec!["run", "--plugin", good];
        all.extend(args);
        assert_one_line_error(&pwhost(&all), needle);
    }
    assert_one_line_error(
        &pwhost(&["run", "--plugin", "/dev/zero"]),
        "cannot read plugin",
    );
    std::fs::remove_file(fifo).ok();
}

#[test]
fn a_plugin_that_traps_still_completes_the_run() {
    let plugin = plugin("wat/trap_in_request_headers.wasm");
    let report = json(&pwhost(&["run", "--plugin", plugin.to_str().unwrap()]));
    assert_eq!(report["http"][0]["local_response"]["status"], 503);
    let fail_open = json(&pwhost(&[
        "run",
        "--plugin",
        plugin.to_str().unwrap(),
        "--failure-policy",
        "fail-open",
    ]));
    assert_eq!(
        fail_open["http"][0]["local_response"],
        serde_json::Value::Null
    );
    assert_eq!(
        fail_open["http"][0]["request_headers"][1],
        serde_json::json!([":path", "/"]),
        "forwarded as it came"
    );
    assert_eq!(
        fail_open["http"][0]["response_headers"][0],
        serde_json::json!([":status", "200"])
    );
    assert!(fail_open["http"][0]["error"]
        .as_str()
        .unwrap()
        .contains("trapped"));
}

#[test]
fn a_reader_that_goes_away_is_not_a_crash() {
    use std::process::Stdio;
    let plugin = plugin("rust/http_headers.wasm");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pwhost"))
        .args([
            "run",
            "--plugin",
            plugin.to_str().unwrap(),
            "--format",
            "text",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close our end of stdout at once, like `pwhost run … | head -0`.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "{stderr}");
}

#[test]
fn bench_times_every_engine_compiled_in() {
    let plugin = plugin("rust/lifecycle_bench.wasm");
    let dir = tempfile::tempdir().unwrap();
    let picture = dir.path().join("matrix.svg");
    let output = pwhost(&[
        "bench",
        "--plugin",
        plugin.to_str().unwrap(),
        "--requests",
        "200",
        "--starts",
        "3",
        "--format",
        "json",
        "--plot",
        picture.to_str().unwrap(),
    ]);
    let figures = json(&output);
    let figures = figures.as_array().expect("one entry per engine");
    // Every engine that runs WebAssembly (the null runtime runs native plugins only).
    let wasm_engines = pwhost::runtimes::available()
        .iter()
        .filter(|name| **name != "null")
        .count();
    assert_eq!(figures.len(), wasm_engines);
    let svg = std::fs::read_to_string(&picture).expect("--plot wrote the picture");
    assert!(svg.starts_with("<svg"), "an SVG document");
    assert!(svg.contains("time per request") && svg.contains("VM start"));
    for engine in figures {
        assert!(engine["request_ns"].as_f64().unwrap() > 0.0, "{engine}");
        assert!(engine["vm_start_us"].as_f64().unwrap() > 0.0, "{engine}");
        let name = engine["runtime"].as_str().unwrap();
        assert!(
            svg.lines().any(|line| line.trim() == name),
            "{name} labelled in the picture"
        );
        // pwhost bench has no floor for an arbitrary plugin: no floor figures are made up.
        assert!(engine.get("floor_request_ns").is_none(), "{engine}");
        // The request ran straight through the plugin: nothing to say of it.
        assert!(engine.get("note").is_none(), "{engine}");
    }
    let progress = String::from_utf8_lossy(&output.stderr);
    assert!(
        progress.contains(&format!("[1/{wasm_engines}]")),
        "{progress}"
    );
    assert_one_line_error(
        &pwhost(&[
            "bench",
            "--plugin",
            plugin.to_str().unwrap(),
            "--runtime",
            "nonesuch",
        ]),
        "nonesuch",
    );
}

#[test]
fn bench_stops_a_plugin_stuck_in_a_loop_and_says_what_of_a_scenario_it_does_not_time() {
    let looping = plugin("wat/infinite_loop.wasm");
    let output = pwhost(&[
        "bench",
        "--plugin",
        looping.to_str().unwrap(),
        "--runtime",
        default_engine(),
        "--deadline-ms",
        "200",
        "--requests",
        "1",
        "--starts",
        "1",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("error: the plugin failed on"), "{stderr}");

    let directory = scratch("bench-scenario");
    let scenario = directory.join("scenario.yaml");
    std::fs::write(
        &scenario,
        "properties: [{path: [a], value: 1}]\nhttp: [{request_body: [\"x\"]}]\n",
    )
    .unwrap();
    let headers = plugin("rust/http_headers.wasm");
    let output = pwhost(&[
        "bench",
        "--plugin",
        headers.to_str().unwrap(),
        "--runtime",
        default_engine(),
        "--scenario",
        scenario.to_str().unwrap(),
        "--requests",
        "10",
        "--starts",
        "1",
    ]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not used: properties, request_body"),
        "{stderr}"
    );
}

#[test]
fn the_memory_cap_refuses_a_plugin_that_needs_more_in_one_line() {
    let plugin = plugin("rust/http_headers.wasm");
    let plugin = plugin.to_str().unwrap();
    // The SDK plugin's memory starts at 17 pages (1088 KiB).
    let output = pwhost(&["run", "--plugin", plugin, "--max-memory-mib", "1"]);
    assert_one_line_error(
        &output,
        "memory minimum size of 17 pages exceeds memory limits",
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.matches("exceeds memory limits").count(),
        1,
        "said once: {stderr}"
    );
    assert!(
        json(&pwhost(&[
            "run",
            "--plugin",
            plugin,
            "--max-memory-mib",
            "2"
        ]))["configure"]
            == true
    );
}

#[test]
fn without_a_setting_plugin_memory_is_capped_at_1_gib_as_in_envoy() {
    let plugin = plugin("wat/memory_cap.wasm");
    let directory = scratch("default-memory-cap");
    let config = directory.join("plugin.yaml");
    std::fs::write(
        &config,
        format!(
            "name: capped\nvm_config: {{code: {{local: {{filename: {}}}}}}}\n",
            plugin.display()
        ),
    )
    .unwrap();
    // What the plugin logged of its two attempts.
    let logs = |args: &[&str]| -> Vec<String> {
        json(&pwhost(args))["logs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|log| Some(log["message"].as_str()?.to_string()))
            .collect()
    };
    // The same default whether the plugin comes from the command line or a configuration.
    for args in [
        ["run", "--plugin", plugin.to_str().unwrap()],
        ["run", "--config", config.to_str().unwrap()],
    ] {
        assert_eq!(
            logs(&args),
            ["grow past 1 GiB: refused", "grow by 1 MiB: allowed"],
            "{args:?}"
        );
    }
    // `--max-memory-mib 0` lifts the cap (growing reserves memory; nothing is touched).
    let unlimited = [
        "run",
        "--plugin",
        plugin.to_str().unwrap(),
        "--max-memory-mib",
        "0",
    ];
    assert_eq!(
        logs(&unlimited),
        ["grow past 1 GiB: allowed", "grow by 1 MiB: allowed"]
    );
}

#[cfg(feature = "null")]
#[test]
fn native_plugins_run_on_the_null_runtime_by_default_and_say_which_limits_do_not_apply() {
    let scenario = root().join("examples/http_headers.yaml");
    let scenario = scenario.to_str().unwrap();
    let library = plugin("native/libhttp_headers.so");
    for plugin in ["native:http_headers", library.to_str().unwrap()] {
        let output = pwhost(&["run", "--plugin", plugin, "--scenario", scenario]);
        let report = json(&output);
        assert_eq!(report["runtime"], "null", "{plugin}");
        let headers = report["http"][0]["request_headers"].to_string();
        assert!(headers.contains("x-pwhost-plugin"), "{plugin}: {headers}");
        assert!(
            output.stderr.is_empty(),
            "no warning unless a limit is asked for"
        );
    }
    let output = pwhost(&[
        "run",
        "--plugin",
        "native:http_headers",
        "--deadline-ms",
        "50",
    ]);
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        "warning: the null runtime cannot enforce --deadline-ms"
    );
}

/// Each VM of an SDK library loads a private copy of it. On Linux that copy is a memory file,
/// so a temporary directory that cannot be used (missing, read-only, or mounted `noexec`, which
/// refuses to map a library) does not stop the plugin.
#[cfg(all(feature = "null", target_os = "linux"))]
#[test]
fn an_sdk_library_runs_without_a_usable_temporary_directory() {
    let scenario = root().join("examples/http_headers.yaml");
    let library = plugin("native/libhttp_headers.so");
    let output = Command::new(env!("CARGO_BIN_EXE_pwhost"))
        .args(["run", "--plugin", library.to_str().unwrap(), "--scenario"])
        .arg(&scenario)
        .env("TMPDIR", "/nonexistent/pwhost-test")
        .output()
        .expect("pwhost runs");
    let report = json(&output);
    let headers = report["http"][0]["request_headers"].to_string();
    assert!(headers.contains("x-pwhost-plugin"), "{headers}");
}

#[cfg(all(feature = "null", feature = "wasmtime"))]
#[test]
fn native_code_on_a_webassembly_engine_is_a_one_line_error() {
    let output = pwhost(&[
        "run",
        "--plugin",
        "native:http_headers",
        "--runtime",
        "wasmtime",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("only the null runtime runs"), "{stderr}");
}

/// A scratch directory of this test process.
fn scratch(name: &str) -> PathBuf {
    let directory = std::env::temp_dir().join(format!("pwhost-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    directory
}

/// A scratch directory (see [`scratch`]) holding corpus plugin `corpus` as `file`.
fn scratch_with(name: &str, corpus: &str, file: &str) -> PathBuf {
    let directory = scratch(name);
    std::fs::copy(plugin(corpus), directory.join(file)).unwrap();
    directory
}

/// The README's configuration example, as it is there.
fn readme_configuration_example() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("## Configuration")
        .nth(1)
        .expect("the README has a configuration section");
    let block = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("with a YAML example");
    block.to_string()
}

#[test]
fn the_readme_configuration_example_runs_as_written() {
    // The code's file name is relative to the configuration's directory.
    let directory = scratch_with("envoy-config", "rust/plugin_config.wasm", "plugin.wasm");
    let config = directory.join("filter.yaml");
    std::fs::write(&config, readme_configuration_example()).unwrap();
    let report = json(&pwhost(&["run", "--config", config.to_str().unwrap()]));
    let request = report["http"][0]["request_headers"].as_array().unwrap();
    assert!(
        request.contains(&serde_json::json!(["x-configured", "yes"])),
        "{request:?}"
    );
    assert_eq!(report["plugins"][0]["name"], "my_plugin");
    assert_eq!(report["plugins"][0]["vm_id"], "my_vm_id");
    assert_eq!(report["logs"][0]["plugin"], "my_plugin");
}

#[test]
fn a_filter_chain_runs_each_request_through_every_plugin_in_order() {
    let directory = scratch_with("chain", "rust/chain_probe.wasm", "probe.wasm");
    let config = directory.join("chain.yaml");
    let filter = |name: &str, vm_id: &str| {
        format!(
            "- name: envoy.filters.http.wasm\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm\n    config:\n      name: {name}\n      configuration: '{{\"name\": \"{name}\"}}'\n      vm_config: {{vm_id: {vm_id}, code: {{local: {{filename: probe.wasm}}}}}}\n"
        )
    };
    std::fs::write(&config, [filter("a", "one"), filter("b", "two")].concat()).unwrap();
    let report = json(&pwhost(&["run", "--config", config.to_str().unwrap()]));
    let exchange = &report["http"][0];
    assert!(exchange["request_headers"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(["x-chain", "a,b"])));
    assert!(exchange["response_headers"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(["x-chain", "b,a"])));
    assert_eq!(exchange["filters"][0]["plugin"], "a");
    assert_eq!(exchange["filters"][1]["plugin"], "b");
    assert_eq!(report["plugins"].as_array().unwrap().len(), 2);
    // The text form shows what each plugin did.
    let text = text_report(&["--config", config.to_str().unwrap()]);
    assert!(
        text.contains("  plugin a\n    actions: ") && text.contains("  plugin b\n    actions: "),
        "{text}"
    );
}

#[test]
fn logs_are_credited_to_their_plugin_on_every_vm_copy() {
    let directory = scratch_with("owners", "rust/envoy_attributes.wasm", "attributes.wasm");
    // An HTTP filter and a network filter sharing one VM; the scenario runs the first on VM
    // copy 0 and the second on copy 1, where their streams get the same context ids.
    let filter = |kind: &str, name: &str, probe: &str| {
        format!(
            "- name: envoy.filters.{kind}.wasm\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.filters.{kind}.wasm.v3.Wasm\n    config:\n      name: {name}\n      configuration: \"{probe}\"\n      vm_config: {{vm_id: shared, code: {{local: {{filename: attributes.wasm}}}}}}\n"
        )
    };
    let config = directory.join("shared.yaml");
    std::fs::write(
        &config,
        [
            filter("http", "x", "request answer uint"),
            filter("network", "z", "connection answer uint"),
        ]
        .concat(),
    )
    .unwrap();
    let scenario = directory.join("scenario.yaml");
    std::fs::write(
        &scenario,
        "vms: 2\nproperties: [{path: [answer], value: 18446744073709551615}]\n\
         http: [{vm: 0}]\ntcp: [{vm: 1, downstream: [\"x\"]}]\n",
    )
    .unwrap();
    let report = json(&pwhost(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--scenario",
        scenario.to_str().unwrap(),
    ]));
    let logs = report["logs"].as_array().unwrap();
    let line = |message: &str| {
        logs.iter()
            .find(|log| log["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} in {logs:?}"))
    };
    // An integer above i64's range is an unsigned integer, not a double.
    let request = line("request answer: 18446744073709551615");
    assert_eq!(
        (&request["plugin"], &request["vm"]),
        (&"x".into(), &0.into())
    );
    let connection = line("connection answer: 18446744073709551615");
    assert_eq!(
        (&connection["plugin"], &connection["vm"]),
        (&"z".into(), &1.into())
    );
}

#[test]
fn a_bad_configuration_is_one_error_naming_the_field() {
    let directory = scratch("bad-config");
    let config = directory.join("bad.yaml");
    std::fs::write(
        &config,
        "config:\n  vmConfig:\n    runtme: envoy.wasm.runtime.v8\n    code: {local: {filename: x.wasm}}\n",
    )
    .unwrap();
    let output = pwhost(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("config.vmConfig.runtme: unknown field"),
        "{stderr}"
    );
    std::fs::write(
        &config,
        "config:\n  vmConfig:\n    runtime: envoy.wasm.runtime.wasmedge\n    code: {local: {filename: x.wasm}}\n",
    )
    .unwrap();
    let stderr =
        String::from_utf8_lossy(&pwhost(&["run", "--config", config.to_str().unwrap()]).stderr)
            .into_owned();
    assert!(
        stderr.contains("config.vm_config.runtime: unknown runtime \"envoy.wasm.runtime.wasmedge\" (this build has: "),
        "{stderr}"
    );
}

#[test]
fn remote_code_fetched_once_starts_again_from_the_cache_without_the_server() {
    let directory = scratch("remote");
    let cache = directory.join("cache");
    let code = std::fs::read(plugin("rust/http_headers.wasm")).unwrap();
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let sha256 = lifecycle::remote::sha256_hex(&code);
    let config = directory.join("remote.yaml");
    std::fs::write(
        &config,
        format!(
            "name: fetched\nvm_config:\n  code:\n    remote:\n      http_uri: {{uri: \"http://127.0.0.1:{port}/plugin.wasm\", timeout: 5s}}\n      sha256: {sha256}\n      retry_policy: {{num_retries: 0}}\n"
        ),
    )
    .unwrap();
    let run = || {
        pwhost(&[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
    };
    // The server answers exactly one request, then goes away.
    let serving = std::thread::spawn(move || {
        let request = server.recv_timeout(std::time::Duration::from_secs(30));
        if let Ok(Some(request)) = request {
            let _ = request.respond(tiny_http::Response::from_data(code));
        }
    });
    let first = json(&run());
    serving.join().unwrap();
    assert_eq!(first["plugins"][0]["name"], "fetched");
    let second = json(&run());
    assert_eq!(
        second["http"][0]["request_headers"],
        first["http"][0]["request_headers"]
    );
    assert!(cache.join("code").join(format!("{sha256}.wasm")).exists());
}

/// A configuration running `code` (a path) on wasmtime with `allow_precompiled` as given.
fn precompiled_config(directory: &Path, code: &Path, allow_precompiled: bool) -> PathBuf {
    let config = directory.join(format!("precompiled-{allow_precompiled}.yaml"));
    std::fs::write(
        &config,
        format!(
            "name: p\nvm_config:\n  runtime: envoy.wasm.runtime.wasmtime\n  allow_precompiled: {allow_precompiled}\n  code: {{local: {{filename: {:?}}}}}\n",
            code.to_str().unwrap()
        ),
    )
    .unwrap();
    config
}

#[cfg(feature = "wasmtime")]
#[test]
fn precompile_adds_a_section_that_runs_only_with_allow_precompiled() {
    let directory = scratch("precompile");
    let output = directory.join("http_headers.precompiled.wasm");
    let done = pwhost(&[
        "precompile",
        "--runtime",
        "envoy.wasm.runtime.wasmtime",
        plugin("rust/http_headers.wasm").to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
    ]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let stderr = String::from_utf8_lossy(&done.stderr).into_owned();
    assert!(
        stderr.contains(&format!(
            "added section precompiled_wasmtime_{}",
            runtime_wasmtime::WASMTIME_VERSION
        )),
        "{stderr}"
    );
    let run = |allow: bool| {
        json(&pwhost(&[
            "run",
            "--config",
            precompiled_config(&directory, &output, allow)
                .to_str()
                .unwrap(),
            "--no-cache",
        ]))
    };
    let allowed = run(true);
    assert_eq!(
        allowed["plugins"][0]["compiled_from"],
        "precompiled_section"
    );
    let refused = run(false);
    assert_eq!(refused["plugins"][0]["compiled_from"], "bytecode");
    assert_eq!(
        allowed["http"], refused["http"],
        "the same plugin either way"
    );
    // Still a plain module for every engine.
    let runtimes = pwhost(&["runtimes"]);
    for engine in String::from_utf8_lossy(&runtimes.stdout).lines() {
        if engine == "null" {
            continue;
        }
        let report = json(&pwhost(&[
            "run",
            "--plugin",
            output.to_str().unwrap(),
            "--runtime",
            engine,
        ]));
        assert_eq!(report["http"], allowed["http"], "on {engine}");
    }
}

#[cfg(feature = "null")]
#[test]
fn precompiling_for_an_engine_that_cannot_is_a_one_line_error() {
    let directory = scratch("precompile-null");
    let out = directory.join("out.wasm");
    let args = |runtime: &'static str| {
        [
            "precompile",
            "--runtime",
            runtime,
            plugin("rust/http_headers.wasm")
                .to_str()
                .unwrap()
                .to_string()
                .leak(),
            "-o",
            out.to_str().unwrap().to_string().leak(),
        ]
    };
    let output = pwhost(&args("null"));
    assert_one_line_error(&output, "the null runtime cannot precompile modules");
    assert!(!out.exists(), "nothing written");
    let output = pwhost(&args("no-such-engine"));
    assert_one_line_error(&output, "--runtime: unknown runtime");
}

#[cfg(feature = "wasmtime")]
#[test]
fn a_second_run_takes_compiled_code_from_the_cache() {
    let directory = scratch("compilation-cache");
    let cache = directory.join("cache");
    let config = precompiled_config(&directory, &plugin("rust/http_headers.wasm"), false);
    let run = || {
        json(&pwhost(&[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ]))
    };
    let first = run();
    assert_eq!(first["plugins"][0]["compiled_from"], "bytecode");
    let second = run();
    assert_eq!(second["plugins"][0]["compiled_from"], "compilation_cache");
    assert_eq!(first["http"], second["http"]);
    let entries = std::fs::read_dir(cache.join("compiled")).unwrap().count();
    assert_eq!(entries, 1);
}

/// `--runtime` takes Envoy's and Traffic Server's engine names with `--plugin` too, as in a
/// configuration file; `bench` refuses to time no requests or no VM starts.
#[test]
fn runtime_names_are_envoys_too_and_bench_times_at_least_one_of_each() {
    let good = plugin("wat/minimal.wasm");
    let good = good.to_str().unwrap();
    let output = pwhost(&[
        "run",
        "--plugin",
        good,
        "--runtime",
        "envoy.wasm.runtime.wasmtime",
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(json(&output)["runtime"], "wasmtime");
    for flag in ["--requests", "--starts"] {
        let output = pwhost(&["bench", "--plugin", good, flag, "0"]);
        assert!(!output.status.success(), "{flag} 0 is refused");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("0 is not in 1.."), "{stderr}");
    }
    // Bench times a request without a body, where holding the headers only would change
    // nothing: the flag is refused, not taken and ignored.
    let output = pwhost(&[
        "bench",
        "--plugin",
        good,
        "--allow-on-headers-stop-iteration",
    ]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unexpected argument '--allow-on-headers-stop-iteration'"),
        "{stderr}"
    );
    // The disk caches serve --config runs (remote code, compiled code); a --plugin run would
    // take them and ignore them, so it refuses them.
    for flags in [&["--no-cache"][..], &["--cache-dir", "/tmp"][..]] {
        let mut args = vec!["run", "--plugin", good];
        args.extend_from_slice(flags);
        let output = pwhost(&args);
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--config <CONFIG>"), "{stderr}");
    }
}

/// `pwhost run` of `plugin` with `ticks` timer ticks, on a worker and as a singleton service
/// named `name` (beside the corpus's `http_headers` as the HTTP filter a run needs): each
/// run's report, with what the run was and the prefix its root errors carry.
fn on_a_worker_and_as_a_service(
    plugin: &Path,
    name: &str,
    ticks: u32,
) -> Vec<(&'static str, String, serde_json::Value)> {
    let headers = self::plugin("rust/http_headers.wasm");
    let directory = tempfile::tempdir().unwrap();
    let scenario = directory.path().join("scenario.yaml");
    std::fs::write(&scenario, format!("ticks: {ticks}\n")).unwrap();
    let as_service = directory.path().join("service.yaml");
    std::fs::write(
        &as_service,
        format!(
            "- name: envoy.bootstrap.wasm\n  typed_config:\n    \
             \"@type\": type.googleapis.com/envoy.extensions.wasm.v3.WasmService\n    \
             singleton: true\n    config:\n      name: {name}\n      vm_config:\n        \
             runtime: envoy.wasm.runtime.wasmtime\n        code: {{local: {{filename: {}}}}}\n\
             - config:\n    name: headers\n    vm_config:\n      \
             runtime: envoy.wasm.runtime.wasmtime\n      code: {{local: {{filename: {}}}}}\n",
            plugin.display(),
            headers.display()
        ),
    )
    .unwrap();
    let scenario = scenario.to_str().unwrap();
    [
        ("on a worker", "--plugin", plugin, String::new()),
        (
            "as a service",
            "--config",
            as_service.as_path(),
            format!("service {name:?}: "),
        ),
    ]
    .into_iter()
    .map(|(what, flag, file, prefix)| {
        let args = ["run", flag, file.to_str().unwrap(), "--scenario", scenario];
        (what, prefix, json(&pwhost(&args)))
    })
    .collect()
}

/// A plugin whose root context makes a call from every tick and from every answer is answered
/// 1000 calls per tick, and at most about 100,000 in the whole run: then its root calls are
/// answered no more, and the report says so once (memory stays bounded however many ticks).
/// The same holds for the plugin as a singleton service, on its thread of its own.
#[test]
fn root_calls_are_answered_within_a_budget_for_the_whole_run() {
    let storm = plugin("wat/tick_call_storm.wasm");
    for (what, from, report) in on_a_worker_and_as_a_service(&storm, "storm", 300) {
        let errors: Vec<&str> = report["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .filter_map(|e| e.as_str())
            .collect();
        // A service's errors are named after it.
        let per_tick =
            format!("{from}the plugin kept making calls: 1000 were answered, the rest were not");
        let budget = format!(
            "{from}the plugin made over 100000 calls in this run: those of its root contexts \
             are answered no more"
        );
        assert_eq!(
            errors.iter().filter(|e| **e == per_tick).count(),
            99,
            "{what}: {errors:?}"
        );
        assert_eq!(
            errors.iter().filter(|e| **e == budget).count(),
            1,
            "{what}: said once, by the tick that crossed it"
        );
        assert_eq!(errors.len(), 100, "{what}");
    }
}

/// `bench` says when what it timed is not the plugin's whole request: here a plugin making
/// calls, which bench does not answer (so the figures time the refusals past 1024 open calls).
#[test]
fn bench_says_when_the_plugin_makes_calls_it_does_not_answer() {
    let flood = plugin("wat/call_flood.wasm");
    let output = pwhost(&[
        "bench",
        "--plugin",
        flood.to_str().unwrap(),
        "--runtime",
        "wasmtime",
        "--requests",
        "20",
        "--starts",
        "1",
        "--format",
        "json",
    ]);
    let figures = json(&output);
    let note = figures[0]["note"].as_str().unwrap_or_default();
    assert!(
        note.starts_with("the plugin makes calls, which bench does not answer"),
        "{figures}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("warning: wasmtime: the plugin makes calls"),
        "{stderr}"
    );
}

/// Scripted answers no call took are said in the exchange's `warnings`, not dropped without a
/// word: a script that no longer matches its plugin shows.
#[test]
fn scripted_answers_no_call_took_are_reported() {
    let directory = tempfile::tempdir().unwrap();
    let scenario = directory.path().join("scenario.yaml");
    std::fs::write(
        &scenario,
        "http:\n  - request_headers: [[\":path\", \"/\"], [\":method\", \"GET\"], \
         [\":authority\", \"x\"]]\n    \
         http_call_responses: [{headers: [[\":status\", \"200\"]]}, {headers: [[\":status\", \"500\"]]}]\n    \
         grpc_call_responses: [{messages: [\"reply\"], status: 0}]\n  \
         - request_headers: [[\":path\", \"/\"], [\":method\", \"GET\"], [\":authority\", \"x\"]]\n    \
         http_call_responses: [{headers: [[\":status\", \"200\"]]}]\n",
    )
    .unwrap();
    let plugin = plugin("rust/http_call.wasm");
    let output = pwhost(&[
        "run",
        "--plugin",
        plugin.to_str().unwrap(),
        "--scenario",
        scenario.to_str().unwrap(),
    ]);
    let report = json(&output);
    let first = &report["http"][0];
    assert_eq!(first["http_calls"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        first["warnings"],
        serde_json::json!([
            "http_call_responses: 1 of the 2 scripted answers went unused (the calls took the first 1)",
            "grpc_call_responses: the scripted answer went unused (no call took it)"
        ])
    );
    // An exchange whose script matches has none (and no field).
    assert!(report["http"][1].get("warnings").is_none(), "{report}");
}

/// Bytes that are not text (a protobuf message, binary data) are scripted as base64, wherever
/// a scenario gives the plugin bytes; text stays text. A bad encoding names the field.
#[test]
fn scenarios_give_plugins_any_bytes_as_base64() {
    let directory = tempfile::tempdir().unwrap();
    let scenario = directory.path().join("scenario.yaml");
    std::fs::write(
        &scenario,
        "http:\n  - request_body: [{base64: \"//5B\"}, \"text\"]\n    \
         grpc_call_responses: [{messages: [{base64: \"YWxp\"}, \"ce\"], status: 0}]\n",
    )
    .unwrap();
    let plugin = plugin("rust/grpc_call.wasm");
    let plugin = plugin.to_str().unwrap();
    let output = pwhost(&[
        "run",
        "--plugin",
        plugin,
        "--scenario",
        scenario.to_str().unwrap(),
    ]);
    let report = json(&output);
    let exchange = &report["http"][0];
    // 0xFF 0xFE 'A' then "text", as forwarded (the report escapes what is not UTF-8).
    assert_eq!(exchange["request_body"], "\\xff\\xfeAtext", "{report}");
    // The unary reply is the messages' bytes joined: the plugin copies it into a header.
    let reply_header = serde_json::json!(["x-grpc-reply", "alice"]);
    assert!(
        exchange["request_headers"]
            .as_array()
            .is_some_and(|headers| headers.contains(&reply_header)),
        "{report}"
    );
    for (chunk, needle) in [
        (
            "{base64: \"!!\"}",
            "http[0].request_body[0]: base64: Invalid symbol 33",
        ),
        (
            "{bas64: \"AA==\"}",
            "http[0].request_body[0]: unknown field `bas64`, expected `base64`",
        ),
        // YAML reads `1.0` as a number whose text is "1": refused, not sent changed.
        (
            "1.0",
            "http[0].request_body[0]: a number: quote it to send its text",
        ),
    ] {
        std::fs::write(&scenario, format!("http:\n  - request_body: [{chunk}]\n")).unwrap();
        assert_one_line_error(
            &pwhost(&[
                "run",
                "--plugin",
                plugin,
                "--scenario",
                scenario.to_str().unwrap(),
            ]),
            needle,
        );
    }
    // A property's value too (e.g. a serialized protobuf message).
    let properties = self::plugin("rust/properties.wasm");
    std::fs::write(
        &scenario,
        "properties:\n  - {path: [source, address], value: {base64: \"MTAuMC4wLjE6NQ==\"}}\n\
         http:\n  - request_headers: [[\":method\", \"GET\"], [\":path\", \"/where\"]]\n",
    )
    .unwrap();
    let report = json(&pwhost(&[
        "run",
        "--plugin",
        properties.to_str().unwrap(),
        "--scenario",
        scenario.to_str().unwrap(),
    ]));
    let read = serde_json::json!(["x-prop-source-address", "10.0.0.1:5"]);
    assert!(
        report["http"][0]["request_headers"]
            .as_array()
            .is_some_and(|headers| headers.contains(&read)),
        "{report}"
    );
}

/// A trap in the answer to a root context's call (here made on a tick) fails the plugin as any
/// trap does: reported, and counted in its `failed_by_trap`, on a worker and as a singleton
/// service alike.
#[test]
fn a_trap_answering_a_root_call_counts_as_the_plugins_failure() {
    let trapping = plugin("wat/trap_in_call_answer.wasm");
    for (what, prefix, report) in on_a_worker_and_as_a_service(&trapping, "trapping", 3) {
        assert_eq!(
            report["errors"],
            serde_json::json!([format!(
                "{prefix}proxy_on_http_call_response trapped in context 1: wasm trap: wasm \
                 `unreachable` instruction executed"
            )]),
            "{what}"
        );
        let counters = report["plugins"]
            .as_array()
            .and_then(|plugins| plugins.iter().find(|p| p["name"] != "headers"))
            .map(|p| p["counters"].clone());
        assert_eq!(
            counters.map(|c| c["failed_by_trap"].clone()),
            Some(serde_json::json!(1)),
            "{what}: {report}"
        );
    }
}
