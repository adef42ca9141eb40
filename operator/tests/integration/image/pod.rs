//! What a kubelet does with one container of the chart's Deployments, done for runc:
//! the Deployment comes from `helm template` (read by kubectl into JSON, as the API
//! server would get it), and from it
//!
//! - the process: `command`/`args` over the image's Entrypoint/Cmd (Kubernetes' rules),
//!   the image's Env, then the container's `env` with `secretKeyRef` read from the real
//!   Secret in the API server and `fieldRef` from the Pod's name and namespace, then
//!   KUBERNETES_SERVICE_HOST/PORT of the test API server;
//! - the security context: UID, GID and fsGroup (a supplementary group), the root
//!   filesystem read-only, every capability dropped, no new privileges. The chart and
//!   the image must agree on 65532:65532; anything else fails the test. Seccomp
//!   (RuntimeDefault) is containerd's profile, which runc does not have: not applied;
//! - the volumes: `emptyDir` as a tmpfs of its size limit, `configMap` from the rendered
//!   ConfigMap, `secret` from the real Secret (mode `defaultMode`, group fsGroup), and
//!   the ServiceAccount token (TokenRequest), API server CA and namespace at
//!   /var/run/secrets/kubernetes.io/serviceaccount when the Pod automounts it. Any other
//!   volume kind fails the test, so a chart change is noticed here.
//!
//! Networking: the container shares the host's network namespace (hostNetwork, in
//! effect). Every server of the test environment listens on loopback, and this machine
//! has no CNI; the ports come from the chart's values, set to free ports by the test.
//! cgroup limits are not applied (`linux.resources` removed, no cgroupsPath): runc
//! cannot create cgroups here.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use serde_json::{Value, json};

use super::{BuiltImage, image_user};
use crate::support::cli::ok;

/// The chart rendered with `sets`, every object as the API server would read it.
pub async fn rendered(release: &str, namespace: &str, sets: &[String]) -> Vec<Value> {
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let yaml = crate::chart::render(release, namespace, &sets).await;
    let json = ok(
        "kubectl",
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        Some(yaml.as_str()),
    )
    .await;
    // One JSON object per document, one after the other.
    serde_json::Deserializer::from_str(&json)
        .into_iter::<Value>()
        .map(|doc| doc.expect("kubectl prints JSON"))
        .collect()
}

/// The Deployment of `component` (operator or gateway).
pub fn deployment<'a>(docs: &'a [Value], component: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == "Deployment"
                && d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        })
        .unwrap_or_else(|| panic!("no {component} Deployment in the rendered chart"))
}

/// What the node gives a Pod: its identity and the API server's address.
pub struct Node {
    pub kube: Client,
    pub namespace: String,
    pub pod_name: String,
    pub api_host: String,
    pub api_port: u16,
    /// PEM of the API server's CA.
    pub api_ca: String,
}

/// The runc config of the first container of `deployment`, with its host-side files
/// under `dir`.
pub async fn runtime_spec(
    image: &BuiltImage,
    docs: &[Value],
    deployment: &Value,
    node: &Node,
    dir: &Path,
) -> Value {
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one container per Pod");
    let container = &containers[0];
    let name = container["name"].as_str().expect("container name");

    // --- security context: the container's over the Pod's.
    let sc = |key: &str| {
        let v = &container["securityContext"][key];
        if v.is_null() {
            pod["securityContext"][key].clone()
        } else {
            v.clone()
        }
    };
    assert_eq!(sc("runAsNonRoot"), true, "{name}: runAsNonRoot");
    let uid = sc("runAsUser").as_u64().expect("runAsUser") as u32;
    let gid = sc("runAsGroup").as_u64().expect("runAsGroup") as u32;
    let fs_group = pod["securityContext"]["fsGroup"].as_u64().map(|g| g as u32);
    assert_eq!(
        (uid, gid),
        image_user(image),
        "{name}: the chart runs as {uid}:{gid}, the image's User is {:?}",
        image.config["config"]["User"]
    );
    assert_eq!((uid, gid), (65532, 65532), "{name}: the nonroot user");
    assert_eq!(sc("readOnlyRootFilesystem"), true, "{name}: read-only root");
    assert_eq!(
        sc("allowPrivilegeEscalation"),
        false,
        "{name}: no escalation"
    );
    let caps = &container["securityContext"]["capabilities"];
    assert_eq!(
        caps["drop"],
        json!(["ALL"]),
        "{name}: every capability dropped"
    );
    assert!(caps["add"].is_null(), "{name}: no capability added");

    // --- process.
    let strings = |v: &Value| -> Option<Vec<String>> {
        v.as_array().map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("string").to_owned())
                .collect()
        })
    };
    let entrypoint = strings(&image.config["config"]["Entrypoint"]).unwrap_or_default();
    let cmd = strings(&image.config["config"]["Cmd"]).unwrap_or_default();
    let args = match (strings(&container["command"]), strings(&container["args"])) {
        (Some(command), args) => [command, args.unwrap_or_default()].concat(),
        (None, Some(args)) => [entrypoint, args].concat(),
        (None, None) => [entrypoint, cmd].concat(),
    };
    let mut env: Vec<(String, String)> = image.config["config"]["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str()?.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(node.kube.clone(), &node.namespace);
    for var in container["env"].as_array().into_iter().flatten() {
        let key = var["name"].as_str().expect("env name").to_owned();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_owned()
        } else if let Some(r) = var["valueFrom"]["secretKeyRef"].as_object() {
            let secret = r["name"].as_str().expect("secret name");
            let item = r["key"].as_str().expect("secret key");
            let s = secrets
                .get(secret)
                .await
                .unwrap_or_else(|e| panic!("{name}: env {key}: Secret {secret}: {e}"));
            let data = s.data.unwrap_or_default();
            let bytes = data
                .get(item)
                .unwrap_or_else(|| panic!("{name}: env {key}: no {item} in Secret {secret}"));
            String::from_utf8(bytes.0.clone()).expect("utf-8")
        } else {
            match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.namespace") => node.namespace.clone(),
                Some("metadata.name") => node.pod_name.clone(),
                other => panic!("{name}: env {key}: unsupported source {other:?}: {var}"),
            }
        };
        env.retain(|(k, _)| *k != key);
        env.push((key, value));
    }
    env.push(("KUBERNETES_SERVICE_HOST".into(), node.api_host.clone()));
    env.push(("KUBERNETES_SERVICE_PORT".into(), node.api_port.to_string()));
    // runc sets HOME from the image's /etc/passwd, as containerd does.

    // --- volumes.
    let mut mounts: Vec<Value> = image.runtime_template["mounts"]
        .as_array()
        .expect("umoci's mounts")
        .clone();
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let vol_name = mount["name"].as_str().expect("mount name");
        let target = mount["mountPath"].as_str().expect("mountPath");
        let read_only = mount["readOnly"].as_bool().unwrap_or(false);
        let volume = volumes
            .iter()
            .find(|v| v["name"] == vol_name)
            .unwrap_or_else(|| panic!("{name}: volume {vol_name} not defined"));
        let host = dir.join("volumes").join(vol_name);
        if let Some(empty) = volume.get("emptyDir") {
            let size = empty["sizeLimit"].as_str().map(quantity_bytes);
            let mut options = vec!["nosuid".to_owned(), "nodev".into(), "mode=1777".into()];
            options.extend(size.map(|s| format!("size={s}")));
            mounts.push(json!({"destination": target, "type": "tmpfs", "source": "tmpfs", "options": options}));
            continue;
        }
        let files: BTreeMap<String, Vec<u8>> = if let Some(cm) = volume.get("configMap") {
            let cm_name = cm["name"].as_str().expect("configMap name");
            let doc = docs
                .iter()
                .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == cm_name)
                .unwrap_or_else(|| panic!("{name}: ConfigMap {cm_name} is not rendered"));
            doc["data"]
                .as_object()
                .expect("data")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("text").as_bytes().to_vec()))
                .collect()
        } else if let Some(s) = volume.get("secret") {
            let secret = s["secretName"].as_str().expect("secretName");
            let data = secrets
                .get(secret)
                .await
                .unwrap_or_else(|e| panic!("{name}: volume {vol_name}: Secret {secret}: {e}"))
                .data
                .unwrap_or_default();
            match s["items"].as_array() {
                Some(items) => items
                    .iter()
                    .map(|i| {
                        let key = i["key"].as_str().expect("key");
                        let bytes = data.get(key).unwrap_or_else(|| {
                            panic!("{name}: volume {vol_name}: no {key} in {secret}")
                        });
                        (
                            i["path"].as_str().expect("path").to_owned(),
                            bytes.0.clone(),
                        )
                    })
                    .collect(),
                None => data.into_iter().map(|(k, v)| (k, v.0)).collect(),
            }
        } else {
            panic!("{name}: volume {vol_name}: a kind this test cannot mount: {volume}")
        };
        let mode = volume
            .get("secret")
            .or_else(|| volume.get("configMap"))
            .and_then(|v| v["defaultMode"].as_u64())
            .unwrap_or(0o644) as u32;
        write_volume(&host, &files, mode, fs_group);
        mounts.push(bind(&host, target, read_only));
    }
    if pod["automountServiceAccountToken"] == true {
        let sa = pod["serviceAccountName"]
            .as_str()
            .expect("serviceAccountName");
        let token = ok(
            "kubectl",
            &[
                "create",
                "token",
                sa,
                "-n",
                &node.namespace,
                "--duration",
                "1h",
            ],
            None,
        )
        .await;
        let host = dir.join("volumes/kube-api-access");
        let files = BTreeMap::from([
            ("token".to_owned(), token.trim().as_bytes().to_vec()),
            ("ca.crt".to_owned(), node.api_ca.as_bytes().to_vec()),
            ("namespace".to_owned(), node.namespace.as_bytes().to_vec()),
        ]);
        // The kubelet's projected volume: 0644, group fsGroup.
        write_volume(&host, &files, 0o644, fs_group);
        mounts.push(bind(
            &host,
            "/var/run/secrets/kubernetes.io/serviceaccount",
            true,
        ));
    }

    // --- the runtime config: umoci's, from the image config, with the Pod's settings.
    let mut spec = image.runtime_template.clone();
    spec["hostname"] = json!(node.pod_name);
    let read_only_root = sc("readOnlyRootFilesystem") == true;
    spec["root"] = json!({"path": image.rootfs, "readonly": read_only_root});
    spec["mounts"] = json!(mounts);
    let process = &mut spec["process"];
    process["terminal"] = json!(false);
    process["args"] = json!(args);
    process["env"] = json!(
        env.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
    );
    process["user"] =
        json!({"uid": uid, "gid": gid, "additionalGids": fs_group.into_iter().collect::<Vec<_>>()});
    process["capabilities"] = json!({
        "bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": [],
    });
    process["noNewPrivileges"] = json!(sc("allowPrivilegeEscalation") == false);
    // The runtime's own limits, as under containerd (umoci's 1024 open files is its own).
    process.as_object_mut().expect("process").remove("rlimits");
    let linux = spec["linux"].as_object_mut().expect("linux");
    linux.remove("resources");
    linux.insert("cgroupsPath".into(), json!(""));
    let namespaces = linux["namespaces"].as_array_mut().expect("namespaces");
    namespaces.retain(|n| n["type"] != "network");
    spec
}

fn bind(host: &Path, target: &str, read_only: bool) -> Value {
    let mut options = vec!["rbind", "nosuid", "nodev"];
    if read_only {
        options.push("ro");
    }
    json!({"destination": target, "type": "bind", "source": host, "options": options})
}

/// Writes `files` into `dir` (root-owned, group `fs_group`, `mode`), as the kubelet
/// lays out a Secret or ConfigMap volume.
fn write_volume(dir: &Path, files: &BTreeMap<String, Vec<u8>>, mode: u32, fs_group: Option<u32>) {
    std::fs::create_dir_all(dir).expect("volume dir");
    let group = fs_group;
    for (name, bytes) in files {
        let path: PathBuf = dir.join(name);
        std::fs::write(&path, bytes).expect("volume file");
        std::os::unix::fs::chown(&path, Some(0), group).expect("chown volume file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .expect("chmod volume file");
    }
    std::os::unix::fs::chown(dir, Some(0), group).expect("chown volume dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Bytes of a Kubernetes quantity such as `16Mi`.
fn quantity_bytes(q: &str) -> u64 {
    let (digits, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = digits.parse().expect("quantity");
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1000,
        "M" => 1_000_000,
        other => panic!("quantity unit {other}"),
    }
}
