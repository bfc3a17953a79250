//! The deployment files in deploy/ are what they say: the Kubernetes manifests parse, have the
//! kinds the docs name, probe the server's health routes, and wire the Service and the
//! autoscaler to the Deployment (labels, selectors, ports); the Indexed Job runs `beit embed`
//! sharded; the Dockerfile has a builder and a runtime stage, a non-root user and the `beit`
//! entry point. (No Docker engine is needed: the image itself is built where Docker is.)

use std::path::Path;

use serde_yaml::Value;

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every YAML document of a file.
fn docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// `labels` includes every entry of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let (Some(sel), Some(lab)) = (selector.as_mapping(), labels.as_mapping()) else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| lab.get(k) == Some(v))
}

#[test]
fn kubernetes_manifest_wires_deployment_service_and_autoscaler() {
    let docs = docs("deploy/kubernetes.yaml");
    let dep = kind(&docs, "Deployment");
    let svc = kind(&docs, "Service");
    let hpa = kind(&docs, "HorizontalPodAutoscaler");
    assert_eq!(s(&dep["apiVersion"]), "apps/v1");
    assert_eq!(s(&svc["apiVersion"]), "v1");
    assert_eq!(s(&hpa["apiVersion"]), "autoscaling/v2");

    // The Deployment's selector matches its pods; the Service selects the same pods.
    let pod_labels = &dep["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&dep["spec"]["selector"]["matchLabels"], pod_labels));
    assert!(selects(&svc["spec"]["selector"], pod_labels));

    // The server container: port, probes on the v2 health routes, resources.
    let containers = dep["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(s).collect();
    assert_eq!(args[0], "serve");
    let port = &c["ports"][0];
    let container_port = port["containerPort"].as_u64().unwrap();
    assert_eq!(container_port, 8080);
    let port_arg = args.iter().position(|a| *a == "--port").unwrap();
    assert_eq!(args[port_arg + 1], container_port.to_string());
    // A probe's port is the container port or its name.
    let probe_port_ok = |p: &Value| p.as_u64() == Some(container_port) || *p == port["name"];
    for (probe, path) in [
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(s(&get["path"]), path, "{probe}");
        assert!(
            probe_port_ok(&get["port"]),
            "{probe} port {:?}",
            get["port"]
        );
    }
    for what in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(!c["resources"][what][r].is_null(), "resources.{what}.{r}");
        }
    }

    // The Service sends its port to the container port (by number or by name).
    let sp = &svc["spec"]["ports"][0];
    let target = &sp["targetPort"];
    assert!(
        target.as_u64() == Some(container_port) || *target == port["name"],
        "targetPort {target:?}"
    );

    // The autoscaler scales this Deployment on CPU.
    let r = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(s(&r["kind"]), "Deployment");
    assert_eq!(r["name"], dep["metadata"]["name"]);
    assert_eq!(s(&r["apiVersion"]), "apps/v1");
    let metric = &hpa["spec"]["metrics"][0];
    assert_eq!(s(&metric["type"]), "Resource");
    assert_eq!(s(&metric["resource"]["name"]), "cpu");
    let (min, max) = (
        hpa["spec"]["minReplicas"].as_u64().unwrap(),
        hpa["spec"]["maxReplicas"].as_u64().unwrap(),
    );
    assert!(1 <= min && min <= max);
}

#[test]
fn batch_job_runs_embed_sharded_by_the_completion_index() {
    let docs = docs("deploy/batch-job.yaml");
    let job = kind(&docs, "Job");
    assert_eq!(s(&job["apiVersion"]), "batch/v1");
    let spec = &job["spec"];
    assert_eq!(s(&spec["completionMode"]), "Indexed");
    let completions = spec["completions"].as_u64().unwrap();
    let c = &spec["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(s).collect();
    assert_eq!(args[0], "embed");
    for flag in ["--model", "--output", "--resume"] {
        assert!(args.contains(&flag), "{flag} in {args:?}");
    }
    // The number of shards the pods are told equals the Job's completions.
    let env = c["env"].as_sequence().unwrap();
    let n = env
        .iter()
        .find(|e| e["name"] == "BEIT_NUM_SHARDS")
        .expect("BEIT_NUM_SHARDS");
    assert_eq!(s(&n["value"]), completions.to_string());
    assert_eq!(s(&spec["template"]["spec"]["restartPolicy"]), "Never");
}

#[test]
fn dockerfile_has_builder_and_slim_runtime_stages() {
    let text = read("deploy/Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let froms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].starts_with("FROM rust:") && froms[0].ends_with(" AS builder"));
    assert!(froms[1].contains("debian:") && froms[1].contains("-slim"));
    let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
    assert!(text.contains("cargo build --release"));
    assert!(text.contains("COPY --from=builder"));
    // Everything after the runtime FROM: a non-root user, the port, the health check.
    let runtime = text.split(froms[1]).nth(1).unwrap();
    assert!(runtime.contains("USER ") && !runtime.contains("USER root"));
    assert!(has("EXPOSE 8080"));
    assert!(has("HEALTHCHECK") && text.contains("/health"));
    assert!(has(r#"ENTRYPOINT ["beit"]"#));
    // The image's command (not the HEALTHCHECK's `CMD` continuation line).
    let cmd = lines.iter().find(|l| l.starts_with("CMD [")).unwrap();
    let cmd: Vec<String> = serde_json::from_str(cmd.trim_start_matches("CMD ")).unwrap();
    assert_eq!(cmd, ["serve", "--model", "/models/model", "--port", "8080"]);
    // The build context leaves the build folder and the git history out.
    let ignore = read(".dockerignore");
    for p in ["target", ".git"] {
        assert!(ignore.lines().any(|l| l.trim() == p), ".dockerignore: {p}");
    }
}
