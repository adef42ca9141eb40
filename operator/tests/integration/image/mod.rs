//! The image (README, "Install on a cluster"). It is built once per test run by
//! `hack/image/build.sh` from this build's debug binaries (the path `make image` takes
//! with release binaries), inspected, and run under runc the way a kubelet runs the
//! chart's Pods (see `pod.rs` for what is taken from the chart and how).
//!
//! These tests need root (runc) and `umoci`, `runc`, `jq` (hack/install-deps.sh); they
//! fail, naming what is missing, without them.

mod pod;
mod run;
mod runc;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use crate::chart::{documents, render};
use crate::support::required_env;

/// The built image: its OCI layout, what it is tagged, and umoci's unpacked bundle
/// (the root filesystem every container of the tests shares, read-only, and the
/// runtime config umoci derives from the image config).
pub struct BuiltImage {
    /// The layout's tag: the workspace version.
    pub tag: String,
    /// `repository:tag`, what `make image` tags and the chart's default must name.
    pub reference: String,
    pub repository: String,
    /// The manifest digest.
    pub digest: String,
    /// The OCI image config (its `config` object holds User, Entrypoint, ...).
    pub config: Value,
    pub rootfs: PathBuf,
    pub runtime_template: Value,
}

static IMAGE: OnceLock<BuiltImage> = OnceLock::new();

/// The image, built on first use (a few seconds: the binaries are already built).
pub fn image() -> &'static BuiltImage {
    IMAGE.get_or_init(build)
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_owned()
}

fn output(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (run hack/install-deps.sh)"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn build() -> BuiltImage {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_m3o-operator"))
        .parent()
        .expect("binary dir");
    assert!(
        bin_dir.join("m3o-gateway-auth").is_file(),
        "{}/m3o-gateway-auth missing: build it with `cargo build --workspace --bins` (make test does)",
        bin_dir.display()
    );
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("image");
    let digest = output(
        Command::new(repo_root().join("hack/image/build.sh"))
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--out")
            .arg(&out),
        "hack/image/build.sh",
    )
    .trim()
    .to_owned();
    let layout = out.join("layout");
    let reference = std::fs::read_to_string(out.join("ref"))
        .expect("build.sh writes ref")
        .trim()
        .to_owned();
    let (repository, tag) = reference.rsplit_once(':').expect("repository:tag");
    let index: Value = read_json(&layout.join("index.json"));
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        tag
    );
    let manifest: Value = serde_json::from_slice(&blob(&layout, &digest)).expect("manifest");
    let config_digest = manifest["config"]["digest"].as_str().expect("config");
    let config: Value = serde_json::from_slice(&blob(&layout, config_digest)).expect("config");

    let bundle = out.join("bundle");
    output(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{tag}", layout.display()))
            .arg(&bundle),
        "umoci unpack",
    );
    BuiltImage {
        tag: tag.to_owned(),
        repository: repository.to_owned(),
        reference: reference.clone(),
        digest,
        config,
        rootfs: bundle.join("rootfs"),
        runtime_template: read_json(&bundle.join("config.json")),
    }
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A blob of the layout, checked against its digest.
fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    use sha2::Digest;
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).expect("blob");
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&bytes)),
        hex,
        "blob digest"
    );
    bytes
}

/// `uid:gid` of the image config's User.
pub fn image_user(image: &BuiltImage) -> (u32, u32) {
    let user = image.config["config"]["User"].as_str().unwrap_or_default();
    let (uid, gid) = user
        .split_once(':')
        .unwrap_or_else(|| panic!("the image's User {user:?} is not numeric uid:gid"));
    (
        uid.parse().expect("numeric uid"),
        gid.parse().expect("numeric gid"),
    )
}

/// What the image is and holds, without running it: the OCI config (user, entrypoint,
/// ports, labels), a distroless-like root filesystem (no shell, no package manager,
/// only the files the binaries need), and the chart's default image reference.
#[tokio::test]
async fn the_image_is_distroless_non_root_and_the_charts_default() {
    required_env("KUBECONFIG"); // helm comes from hack/env.sh's PATH
    let image = image();
    let config = &image.config["config"];
    assert_eq!(image_user(image), (65532, 65532), "User");
    assert_eq!(
        image.tag,
        env!("CARGO_PKG_VERSION"),
        "tagged with the version"
    );
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/m3o-operator"])
    );
    assert_eq!(config["Cmd"], serde_json::json!(["run"]));
    for port in ["8080/tcp", "8081/tcp"] {
        assert!(config["ExposedPorts"].get(port).is_some(), "exposes {port}");
    }
    let labels = &config["Labels"];
    let label = |k: &str| {
        labels[format!("org.opencontainers.image.{k}")]
            .as_str()
            .unwrap_or_else(|| panic!("label org.opencontainers.image.{k}: {labels}"))
            .to_owned()
    };
    assert_eq!(label("version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(label("licenses"), env!("CARGO_PKG_LICENSE"));
    let head = output(
        Command::new("git")
            .arg("-C")
            .arg(repo_root())
            .args(["rev-parse", "HEAD"]),
        "git rev-parse",
    );
    assert!(
        label("revision").starts_with(head.trim()),
        "revision {} is HEAD {head}",
        label("revision")
    );
    assert_eq!(image.config["os"], "linux");

    // The chart's default image is what the build tagged.
    let rendered = render("t", "default", &[]).await;
    let images: Vec<String> = documents(&rendered)
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .map(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"]
                .as_str()
                .expect("image")
                .to_owned()
        })
        .collect();
    assert_eq!(
        images,
        std::slice::from_ref(&image.reference),
        "the chart's default image"
    );
    // Every port the chart's containers declare (gateway enabled) is one the image exposes.
    let with_gateway = render("t", "default", &["gateway.enabled=true"]).await;
    for doc in documents(&with_gateway)
        .iter()
        .filter(|d| d["kind"] == "Deployment")
    {
        let ports = doc["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_sequence()
            .expect("container ports");
        for port in ports {
            let exposed = format!("{}/tcp", port["containerPort"].as_u64().expect("port"));
            assert!(
                config["ExposedPorts"].get(&exposed).is_some(),
                "the chart's port {exposed} is not exposed by the image"
            );
        }
    }

    // Every file of the root filesystem is one the binaries need; nothing else.
    let mut files = Vec::new();
    walk(&image.rootfs, &image.rootfs, &mut files);
    let allowed = |f: &str| {
        matches!(
            f,
            "usr/local/bin/m3o-operator"
                | "usr/local/bin/m3o-gateway-auth"
                | "etc/passwd"
                | "etc/group"
                | "etc/nsswitch.conf"
                | "etc/ssl/certs/ca-certificates.crt"
        ) || (f.starts_with("usr/lib/x86_64-linux-gnu/") && f.contains(".so"))
            || (f.starts_with("usr/share/doc/") && f.ends_with("/copyright"))
            || f.starts_with("var/lib/dpkg/status.d/")
    };
    let unexpected: Vec<&String> = files.iter().filter(|f| !allowed(f)).collect();
    assert!(
        unexpected.is_empty(),
        "not needed at run time: {unexpected:?}"
    );
    for shell_or_packager in [
        "bin/sh",
        "usr/bin/sh",
        "bin/bash",
        "usr/bin/dpkg",
        "usr/bin/apt",
    ] {
        assert!(
            !image.rootfs.join(shell_or_packager).exists(),
            "{shell_or_packager} in the image"
        );
    }
    for binary in ["m3o-operator", "m3o-gateway-auth"] {
        let path = image.rootfs.join("usr/local/bin").join(binary);
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{binary} is not in the image: {e}"))
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o755, "{binary} mode");
    }
    let passwd = std::fs::read_to_string(image.rootfs.join("etc/passwd")).expect("passwd");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("nonroot:x:65532:65532:"))
    );
    let group = std::fs::read_to_string(image.rootfs.join("etc/group")).expect("group");
    assert!(group.lines().any(|l| l.starts_with("nonroot:x:65532:")));

    // The CA bundle: Debian's roots, each a PEM certificate openssl reads.
    let bundle = image.rootfs.join("etc/ssl/certs/ca-certificates.crt");
    let pem = std::fs::read_to_string(&bundle).expect("the image has a CA bundle");
    let count = pem.matches("-----BEGIN CERTIFICATE-----").count();
    assert!(count >= 100, "{count} CA certificates in the bundle");
    let listed = output(
        Command::new("openssl")
            .args(["storeutl", "-noout", "-certs"])
            .arg(&bundle),
        "openssl storeutl",
    );
    assert!(
        listed.contains(&format!("Total found: {count}")),
        "openssl reads every certificate: {listed}"
    );
}

/// Regular files and symlinks under `dir`, relative to `root`.
fn walk(root: &Path, dir: &Path, files: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("read rootfs") {
        let path = entry.expect("entry").path();
        let meta = std::fs::symlink_metadata(&path).expect("metadata");
        if meta.is_dir() {
            walk(root, &path, files);
        } else {
            let rel = path.strip_prefix(root).expect("under root");
            let rel = rel.to_str().expect("utf-8").to_owned();
            // Symlinks of the merged /usr and of the loader point inside the image.
            if !meta.file_type().is_symlink() {
                files.push(rel);
            }
        }
    }
}
