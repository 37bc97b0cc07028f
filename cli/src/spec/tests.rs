use proptest::prelude::*;

use super::*;

const GOOD: &str = r#"
name: hello
kind: service
runtime:
  wasi:
    module: ./hello.wasm
command: [hello]
args: ["--name", "world"]
env:
  GREETING: hi
resources:
  requests: { cpu: 100m, memory: 32Mi }
  limits: { cpu: "0.5", memory: 64Mi }
replicas: 3
minAvailable: 2
priority: 10
placement:
  nodeSelector: { tier: edge }
  zones: [a, b]
  required:
    - { key: arch, operator: In, values: [x86_64, aarch64] }
  preferred:
    - { weight: 10, key: ssd, operator: Exists }
  antiAffinity:
    - { workload: hello, topology: node }
  spread: { topology: zone, maxSkew: 1 }
  devices: { classes: [server, desktop], allowBattery: false }
  strategy: spread
probes:
  liveness: { http: { port: 8080, path: /health }, periodSeconds: 5 }
  readiness: { tcp: { port: 8080 } }
ports: [8080, { port: 5353, protocol: udp }]
network: true
"#;

fn err(text: &str) -> (String, String) {
    match parse(text) {
        Err(SpecError::Invalid { path, reason }) => (path, reason),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn a_full_document_becomes_the_spec_users_meant() {
    let p = parse(GOOD).unwrap();
    assert_eq!(p.module, Some(Module::Path("./hello.wasm".into())));
    let hash = cloudless_types::ModuleHash::new("ab".repeat(32)).unwrap();
    let s = p.with_module_hash(&hash).unwrap();
    assert_eq!(s.name, "hello");
    assert_eq!(s.image, Image::Wasi(hash));
    assert_eq!((s.requests.cpu_millis, s.requests.memory_mib), (100, 32));
    assert_eq!(s.limits.map(|l| (l.cpu_millis, l.memory_mib)), Some((500, 64)));
    assert_eq!((s.replicas, s.min_available, s.priority), (3, 2, 10));
    assert_eq!(s.restart, Restart::Always);
    assert_eq!(s.ports, [Port { port: 8080, udp: false }, Port { port: 5353, udp: true }]);
    assert_eq!(s.placement.zones, ["a", "b"]);
    assert_eq!(s.placement.preferred_node_rules[0].0, 10);
    assert_eq!(s.placement.device.classes, [DeviceClass::Server, DeviceClass::Desktop]);
    assert_eq!(s.placement.strategy, cloudless_types::placement::Strategy::Spread);
    let live = s.liveness.unwrap();
    assert_eq!(live.check, ProbeCheck::Http { port: 8080, path: "/health".into() });
    assert_eq!(live.period_ms, 5000);
    assert!(s.network);
}

#[test]
fn json_works_too_and_defaults_are_sensible() {
    let json = r#"{"name": "job1", "kind": "job",
        "runtime": {"container": {"image": "busybox:1.36"}},
        "resources": {"requests": {"cpu": 0.25, "memory": "1Gi"}}}"#;
    let p = parse(json).unwrap();
    assert_eq!(p.module, None);
    let s = p.spec;
    assert_eq!(s.image, Image::Container("busybox:1.36".into()));
    assert_eq!((s.requests.cpu_millis, s.requests.memory_mib), (250, 1024));
    assert_eq!((s.kind, s.restart, s.replicas), (Kind::Job, Restart::OnFailure, 1));
}

#[test]
fn mistakes_are_refused_with_the_field_path() {
    let base =
        "name: web\nruntime: {container: {image: busybox}}\nresources: {requests: {cpu: 100m}}\n";
    let cases: &[(&str, &str, &str)] = &[
        ("replicaz: 3\n", "replicaz", "unknown field `replicaz`"),
        ("replicas: three\n", "replicas", "invalid type"),
        ("ports: [0]\n", "ports[0]", "port 0"),
        ("minAvailable: 5\n", "minAvailable", "more than replicas"),
        ("priority: 5000\n", "priority", "not in"),
        ("timeoutSeconds: 0\n", "timeoutSeconds", "0 would stop"),
        (
            "probes: {liveness: {http: {port: 80}, tcp: {port: 80}}}\n",
            "probes.liveness",
            "exactly one",
        ),
        (
            "probes: {readiness: {tcp: {port: 80}, periodSeconds: 0.01}}\n",
            "probes.readiness.period_ms",
            "below",
        ),
        ("placement: {devices: {classes: [toaster]}}\n", "placement.devices.classes[0]", "toaster"),
        (
            "placement: {required: [{key: a, operator: Exists, values: [x]}]}\n",
            "placement.required[0].values",
            "no values",
        ),
        ("kind: job\nrestart: always\n", "restart", "runs to completion"),
        ("env: {\"1BAD\": x}\n", "env.1BAD", "name must be"),
    ];
    for (extra, path, reason) in cases {
        let (p, r) = err(&format!("{base}{extra}"));
        assert!(p.starts_with(path), "{extra}: path {p:?}, expected {path:?} ({r})");
        assert!(r.contains(reason), "{extra}: reason {r:?}, expected {reason:?}");
    }
    let (p, r) = err(
        "name: web\nruntime: {container: {image: busybox}}\nresources: {requests: {cpu: 100m, memory: 12 bananas}}\n",
    );
    assert_eq!(p, "resources.requests.memory", "{r}");
    let (p, _) = err(
        "name: web\nruntime: {wasi: {module: x}, container: {image: y}}\nresources: {requests: {cpu: 1}}\n",
    );
    assert!(p.starts_with("runtime"), "{p}");
    let (p, _) = err(
        "name: web\nruntime: {container: {image: busybox}}\nresources: {requests: {cpu: 1.00001}}\n",
    );
    assert_eq!(p, "resources.requests.cpu");
    assert!(matches!(parse(&"#".repeat(MAX_DOCUMENT + 1)), Err(SpecError::TooLarge(_))));
    let (p, r) =
        err("name: Web\nruntime: {container: {image: busybox}}\nresources: {requests: {cpu: 1}}\n");
    assert_eq!(p, "name", "{r}");
}

#[test]
fn units() {
    let q = |s: &str| Quantity::Text(s.into());
    assert_eq!(cpu(&q("250m"), "c"), Ok(250));
    assert_eq!(cpu(&q("2"), "c"), Ok(2000));
    assert_eq!(cpu(&Quantity::Number(0.5), "c"), Ok(500));
    assert!(cpu(&q("-1"), "c").is_err());
    assert_eq!(mebibytes(&q("64Mi"), "m"), Ok(64));
    assert_eq!(mebibytes(&q("1Gi"), "m"), Ok(1024));
    assert_eq!(mebibytes(&q("100M"), "m"), Ok(96));
    assert_eq!(mebibytes(&Quantity::Number(1.0), "m"), Ok(1), "rounded up");
    assert!(mebibytes(&q("1Pi"), "m").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary text never panics the parser, and a refusal always names where.
    #[test]
    fn arbitrary_text_is_refused_cleanly(text in "\\PC{0,400}") {
        if let Err(SpecError::Invalid { path, reason }) = parse(&text) {
            prop_assert!(!path.is_empty() && !reason.is_empty());
        }
    }

    /// Dropping any line of a good document gives a spec or a located refusal, never a panic.
    #[test]
    fn damaged_documents_are_refused_cleanly(drop in 0usize..40, junk in "[a-zA-Z:{}\\[\\], -]{0,12}") {
        let mut lines: Vec<&str> = GOOD.lines().collect();
        let i = drop % lines.len();
        lines[i] = &junk;
        let text = lines.join("\n");
        match parse(&text) {
            Ok(p) => prop_assert!(p.spec.name == "hello"),
            Err(SpecError::Invalid { path, .. }) => prop_assert!(!path.is_empty()),
            Err(SpecError::TooLarge(_)) => prop_assert!(false),
        }
    }
}
