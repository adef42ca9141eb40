//! The image run under runc with the chart's Pod settings: the chart is installed with
//! `helm install` into the test API server (with the built image's digest; accepted
//! server-side under the restricted Pod Security Standard, never run: no kubelet), and
//! its rendered Deployments are run from the image by `pod.rs` and `runc.rs`, the
//! operator with a token of the ServiceAccount the chart's RBAC binds.

use std::collections::BTreeMap;
use std::process::ExitStatus;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

use super::pod::{Node, deployment, rendered, runtime_spec};
use super::runc::{Container, container_dir};
use super::{BuiltImage, image};
use crate::chart::{RESTRICTED, create_namespace, helm, install, kubectl};
use crate::support::gateway::request;
use crate::support::tls_backends::TlsBackends;
use crate::support::{TestEnv, free_port, required_env, suffix};

/// One installed release of the chart and what the test set in it.
struct Release {
    name: String,
    namespace: String,
    lease: String,
    docs: Vec<Value>,
}

/// One Pod of a release, running from the image.
struct Pod {
    container: Container,
    name: String,
    /// terminationGracePeriodSeconds.
    grace: Duration,
    /// The container's ports by name, as the chart declares them (the test probes
    /// these: a port the chart declares but the binary does not serve fails).
    ports: BTreeMap<String, u16>,
}

impl Release {
    /// Creates the release namespace and `secrets` in it, and installs the chart with
    /// the test's slice of the environment (namespace, schema, prefixes, free ports),
    /// the gateway enabled, the built image by digest, and `extra` values.
    async fn install(
        env: &TestEnv,
        image: &BuiltImage,
        secrets: &[(&str, BTreeMap<String, String>)],
        extra: &[String],
    ) -> Self {
        let namespace = format!("{}-sys", env.ns);
        create_namespace(&namespace, &RESTRICTED).await;
        let api: Api<Secret> = Api::namespaced(env.kube.clone(), &namespace);
        for (name, data) in secrets {
            let secret: Secret = serde_json::from_value(json!({
                "metadata": {"name": name}, "stringData": data,
            }))
            .expect("secret");
            api.create(&PostParams::default(), &secret)
                .await
                .unwrap_or_else(|e| panic!("create Secret {name}: {e}"));
        }
        let name = format!("m3o-{}", suffix());
        let lease = format!("{name}-leader");
        let (metrics_port, gateway_port, gateway_metrics_port) =
            (free_port(), free_port(), free_port());
        let mut sets = vec![
            format!("image.repository={}", image.repository),
            format!("image.digest={}", image.digest),
            format!("watchNamespace={}", env.ns),
            format!("database.schema={}", env.schema),
            format!("events.streamPrefix={}", env.stream_prefix),
            format!("platformConfig.etcdPrefix={}", env.etcd_prefix),
            format!("leaderElection.leaseName={lease}"),
            format!("metrics.port={metrics_port}"),
            "gateway.enabled=true".to_owned(),
            // The plain test servers have no ACLs: the gateway may share the URLs here.
            "gateway.existingSecret=m3o-operator-backends".to_owned(),
            format!("gateway.port={gateway_port}"),
            format!("gateway.metricsPort={gateway_metrics_port}"),
            format!("gateway.redisPrefix={}gw:", env.stream_prefix),
        ];
        sets.extend(extra.iter().cloned());
        let set_refs: Vec<&str> = sets.iter().map(String::as_str).collect();
        install(&name, &namespace, &set_refs).await;
        let docs = rendered(&name, &namespace, &sets).await;
        // What the API server holds is what was rendered: the built image, by digest.
        let installed = kubectl(&[
            "get",
            "deployments",
            "-n",
            &namespace,
            "-o",
            "jsonpath={.items[*].spec.template.spec.containers[*].image}",
        ])
        .await;
        let by_digest = format!("{}@{}", image.repository, image.digest);
        assert_eq!(
            installed.split_whitespace().collect::<Vec<_>>(),
            [by_digest.as_str(), by_digest.as_str()],
            "both Deployments run the built image"
        );
        Self {
            name,
            namespace,
            lease,
            docs,
        }
    }

    /// Runs the rendered Deployment of `component` from the image.
    async fn run(&self, env: &TestEnv, component: &str) -> Pod {
        let deployment = deployment(&self.docs, component);
        self.run_template(env, component, deployment).await
    }

    /// Runs the Pod template of `owner` (a Deployment or a Job) from the image.
    async fn run_template(&self, env: &TestEnv, component: &str, deployment: &Value) -> Pod {
        let image = image();
        let pod_name = format!("{}-{component}-{}", self.name, suffix());
        let config = kube::Config::infer().await.expect("kubeconfig");
        let api_host = config
            .cluster_url
            .host()
            .expect("API server host")
            .to_owned();
        let api_port = config.cluster_url.port_u16().unwrap_or(443);
        let ca_path = std::path::Path::new(&required_env("M3O_ENV_DIR")).join("pki/ca.crt");
        let node = Node {
            kube: env.kube.clone(),
            namespace: self.namespace.clone(),
            pod_name: pod_name.clone(),
            api_host,
            api_port,
            api_ca: std::fs::read_to_string(&ca_path).expect("the API server's CA"),
        };
        let (id, dir) = container_dir(component);
        let spec = runtime_spec(image, &self.docs, deployment, &node, &dir).await;
        // A Pod without them gets the Kubernetes defaults (30 s, no ports).
        let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        let ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| {
                let name = p["name"].as_str().expect("port name").to_owned();
                (
                    name,
                    p["containerPort"].as_u64().expect("containerPort") as u16,
                )
            })
            .collect();
        Pod {
            container: Container::start(id, dir, &spec),
            name: pod_name,
            grace: Duration::from_secs(grace),
            ports,
        }
    }

    async fn lease_holder(&self) -> String {
        kubectl(&[
            "get",
            "lease",
            &self.lease,
            "-n",
            &self.namespace,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .await
    }

    /// `helm uninstall` with its pre-delete hook, this test acting as the kubelet and
    /// the Job controller: the hook Job Helm creates is run from the image under runc,
    /// and its outcome written to the Job's status, which Helm waits for. Returns
    /// Helm's output and the hook container's exit status.
    async fn uninstall_through_hook(&self, env: &TestEnv) -> (std::process::Output, ExitStatus) {
        let args = [
            "uninstall",
            &self.name,
            "-n",
            &self.namespace,
            "--timeout",
            "90s",
        ]
        .map(str::to_owned);
        let helm = tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::support::cli::run("helm", &args, None).await
        });
        let job_name = format!("{}-m3o-operator-uninstall-check", self.name);
        let job: Value = crate::support::eventually(
            "Helm to create the pre-delete hook Job",
            Duration::from_secs(30),
            || async {
                let out = crate::support::cli::run(
                    "kubectl",
                    &["get", "job", &job_name, "-n", &self.namespace, "-o", "json"],
                    None,
                )
                .await;
                out.status
                    .success()
                    .then(|| serde_json::from_slice(&out.stdout).expect("Job JSON"))
            },
        )
        .await;
        let mut pod = self.run_template(env, "uninstall-check", &job).await;
        let exit = crate::support::eventually(
            "the hook container to exit",
            Duration::from_secs(60),
            || {
                let exit = pod.container.try_exit();
                async move { exit }
            },
        )
        .await;
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let condition = |kind: &str| {
            json!({"type": kind, "status": "True", "reason": "ByTest", "message": "run under runc",
                   "lastProbeTime": now, "lastTransitionTime": now})
        };
        let status = if exit.success() {
            json!({"status": {"startTime": now, "completionTime": now, "succeeded": 1,
                   "conditions": [condition("SuccessCriteriaMet"), condition("Complete")]}})
        } else {
            json!({"status": {"startTime": now, "failed": 1,
                   "conditions": [condition("FailureTarget"), condition("Failed")]}})
        };
        kubectl(&[
            "patch",
            "job",
            &job_name,
            "-n",
            &self.namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])
        .await;
        let out = helm.await.expect("helm uninstall");
        println!("hook output: {}", pod.container.output());
        (out, exit)
    }

    async fn uninstall(&self) {
        helm(&["uninstall", &self.name, "-n", &self.namespace, "--no-hooks"]).await;
    }
}

/// The operator container: healthy and ready, leading, provisioning a Customer,
/// Subscription and ApiKey; the gateway container answering 200 for the key and 401
/// for another; both exit 0 on SIGTERM within their grace periods, the operator
/// releasing its Lease. Returns nothing: panics on any difference.
async fn operator_and_gateway(env: &TestEnv, release: &Release) {
    let mut operator = release.run(env, "operator").await;
    let startup = Duration::from_secs(120);
    let metrics = operator.ports["metrics"];
    operator
        .container
        .wait_http_ok(metrics, "/healthz", startup)
        .await;
    operator
        .container
        .wait_http_ok(metrics, "/readyz", startup)
        .await;
    let holder = crate::support::eventually(
        "the operator in the container holds the Lease",
        Duration::from_secs(30),
        || async {
            let h = release.lease_holder().await;
            (!h.is_empty()).then_some(h)
        },
    )
    .await;
    assert_eq!(holder, operator.name, "the Pod's name (POD_NAME) leads");

    env.customer_with_pro_subscription("alice").await;
    env.apply_apikey(
        "alice-key",
        json!({"customerRef": {"name": "alice"}, "description": "image test", "scopes": ["*"]}),
    )
    .await;
    env.wait_apikey("alice-key", "True", "Provisioned").await;
    let key = env
        .secret_key("alice-key-api-key")
        .await
        .expect("the key in its Secret");

    let mut gateway = release.run(env, "gateway").await;
    let gateway_metrics = gateway.ports["metrics"];
    gateway
        .container
        .wait_http_ok(gateway_metrics, "/readyz", startup)
        .await;
    let addr = format!("127.0.0.1:{}", gateway.ports["auth"]);
    let check = |key: String| {
        let addr = addr.clone();
        async move {
            let auth = format!("Bearer {key}");
            request(
                &addr,
                "/auth",
                &[
                    ("Authorization", &auth),
                    ("X-Original-URI", "/v1/helloworld/call"),
                ],
            )
            .await
        }
    };
    let reply = crate::support::eventually(
        "the gateway container answers 200 for the key",
        Duration::from_secs(30),
        || async {
            let reply = check(key.clone()).await;
            (reply.status == 200).then_some(reply)
        },
    )
    .await;
    assert!(reply.header("X-M3O-Key-Id").is_some(), "{reply:?}");
    let wrong = check(format!("{key}x")).await;
    assert_eq!(wrong.status, 401, "a wrong key: {wrong:?}");

    let status = gateway.container.terminate(gateway.grace).await;
    let log = gateway.container.output();
    assert!(status.success(), "gateway exit on SIGTERM: {status}\n{log}");
    let status = operator.container.terminate(operator.grace).await;
    let log = operator.container.output();
    assert!(
        status.success(),
        "operator exit on SIGTERM: {status}\n{log}"
    );
    assert_eq!(
        release.lease_holder().await,
        "",
        "the Lease is released:\n{log}"
    );
    let denied: Vec<&str> = log
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("forbidden"))
        .collect();
    assert!(denied.is_empty(), "refused by RBAC:\n{}", denied.join("\n"));
}

fn backends(database_url: &str, redis_url: &str, etcd: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("DATABASE_URL".to_owned(), database_url.to_owned()),
        ("REDIS_URL".to_owned(), redis_url.to_owned()),
        ("ETCD_ENDPOINTS".to_owned(), etcd.to_owned()),
    ])
}

/// README "Uninstall": `helm uninstall` is refused by the chart's pre-delete hook (the
/// image's `uninstall-check`, run under runc with the chart's ServiceAccount token)
/// while an object carries the finalizer, leaving the release in place; once the
/// objects are deleted (the operator running), the same uninstall goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_uninstall_is_refused_by_the_pre_delete_hook_while_objects_exist() {
    let env = TestEnv::new("image-hook").await;
    let image = image();
    let secrets = [(
        "m3o-operator-backends",
        backends(&env.database_url, &env.redis_url, &env.etcd_endpoints),
    )];
    let release = Release::install(&env, image, &secrets, &[]).await;
    let op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;

    let (refused, exit) = release.uninstall_through_hook(&env).await;
    let said = crate::support::cli::text(&refused);
    assert!(!exit.success(), "the hook refuses while alice exists");
    assert!(
        !refused.status.success(),
        "helm uninstall went through: {said}"
    );
    let deployment = format!("deployment/{}-m3o-operator", release.name);
    kubectl(&["get", &deployment, "-n", &release.namespace]).await; // still installed

    kubectl(&[
        "delete",
        "customers.m3o.com",
        "--all",
        "-n",
        &env.ns,
        "--wait=true",
        "--timeout=60s",
    ])
    .await;
    let (done, exit) = release.uninstall_through_hook(&env).await;
    assert!(exit.success(), "the hook passes once the objects are gone");
    assert!(
        done.status.success(),
        "{}",
        crate::support::cli::text(&done)
    );
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_the_charts_operator_and_gateway_under_runc() {
    let env = TestEnv::new("image").await;
    let image = image();
    let secrets = [(
        "m3o-operator-backends",
        backends(&env.database_url, &env.redis_url, &env.etcd_endpoints),
    )];
    let release = Release::install(&env, image, &secrets, &[]).await;
    operator_and_gateway(&env, &release).await;
    release.uninstall().await;
}

/// The same with every backend on TLS with client certificates and least-privilege
/// users (tls.rs's private servers): the chart mounts the CA and client files from
/// Secrets, and the binaries in the image read them as 65532 (group fsGroup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_the_charts_operator_and_gateway_over_tls_under_runc() {
    let mut env = TestEnv::new("image-tls").await;
    let image = image();
    let tls = TlsBackends::start(&env).await;
    env.db = tls.admin_db.clone();
    env.etcd = tls.admin_etcd.clone();
    let operator = tls.servers.operator_backends(None);
    let flag = |name: &str| {
        let at = operator
            .extra_args
            .iter()
            .position(|a| a == name)
            .unwrap_or_else(|| panic!("{name} in the TLS backends' flags"));
        operator.extra_args[at + 1].clone()
    };
    let read = |path: String| std::fs::read_to_string(&path).expect("TLS file");
    let (ca, cert, key) = (
        flag("--etcd-ca-file"),
        flag("--etcd-cert-file"),
        flag("--etcd-key-file"),
    );
    let files = BTreeMap::from([
        ("ca.crt".to_owned(), read(ca.clone())),
        ("tls.crt".to_owned(), read(cert.clone())),
        ("tls.key".to_owned(), read(key.clone())),
    ]);
    // The URL names the files where the chart mounts them.
    let database_url = operator
        .database_url
        .as_deref()
        .expect("database URL")
        .replace(&ca, "/etc/m3o-operator/tls/postgres/ca.crt")
        .replace(&cert, "/etc/m3o-operator/tls/postgres/tls.crt")
        .replace(&key, "/etc/m3o-operator/tls/postgres/tls.key");
    let gateway = tls.servers.gateway_config(&env);
    let backend_values = backends(
        &database_url,
        operator.redis_url.as_deref().expect("redis URL"),
        operator.etcd_endpoints.as_deref().expect("etcd endpoints"),
    );
    // The gateway's own Secret: its Redis ACL user (README: Secure connections).
    let gateway_values = BTreeMap::from([
        ("REDIS_URL".to_owned(), gateway.redis_url.clone()),
        ("ETCD_ENDPOINTS".to_owned(), gateway.etcd_endpoints.clone()),
    ]);
    let password = BTreeMap::from([("password".to_owned(), tls.servers.password())]);
    let secrets = [
        ("m3o-operator-backends", backend_values),
        ("gateway-backends", gateway_values),
        ("backend-tls", files),
        ("etcd-auth", password),
    ];
    let extra: Vec<String> = [
        "tls.postgres.existingSecret=backend-tls",
        "tls.redis.existingSecret=backend-tls",
        "tls.redis.clientCertificate=true",
        "tls.etcd.existingSecret=backend-tls",
        "tls.etcd.clientCertificate=true",
        "etcdAuth.username=m3o-operator",
        "etcdAuth.passwordSecret=etcd-auth",
        "gateway.etcdAuth.username=m3o-gateway",
        "gateway.etcdAuth.passwordSecret=etcd-auth",
        "gateway.existingSecret=gateway-backends",
        "gateway.tls.redis.existingSecret=backend-tls",
        "gateway.tls.redis.clientCertificate=true",
        "gateway.tls.etcd.existingSecret=backend-tls",
        "gateway.tls.etcd.clientCertificate=true",
    ]
    .map(str::to_owned)
    .to_vec();
    let release = Release::install(&env, image, &secrets, &extra).await;
    operator_and_gateway(&env, &release).await;
    // The operator wrote to the private TLS servers, not to the shared ones.
    let customer = env.row("alice").await.expect("row in the private database");
    assert!(
        env.etcd_json(&format!("customers/{}", customer.id))
            .await
            .is_some(),
        "customer entry in the private etcd"
    );
    release.uninstall().await;
}
