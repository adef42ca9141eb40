//! The test PKI of the TLS backends.

use std::path::Path;

use super::{OPERATOR_USER, chmod};

/// CA, server certificate for 127.0.0.1 only, client certificate (CN m3o-operator),
/// and a second, unrelated CA for the wrong-CA tests. ECDSA P-256: quick to make.
pub(super) fn make_pki(dir: &Path) {
    let openssl = |args: Vec<String>| {
        let out = std::process::Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .expect("openssl (install-deps installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for ca in ["ca", "other-ca"] {
        let mut args = words(&format!(
            "req -x509 {ec} -keyout {ca}.key -out {ca}.crt -days 2 \
             -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign -subj"
        ));
        args.push(format!("/CN={ca}"));
        openssl(args);
    }
    for (leaf, cn, san) in [
        ("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\n"),
        ("client", OPERATOR_USER, ""),
    ] {
        openssl(words(&format!(
            "req -new {ec} -keyout {leaf}.key -out {leaf}.csr -subj /CN={cn}"
        )));
        let ext = format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth,clientAuth\n{san}"
        );
        std::fs::write(dir.join(format!("{leaf}.ext")), ext).expect("ext file");
        openssl(words(&format!(
            "x509 -req -in {leaf}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
             -extfile {leaf}.ext -out {leaf}.crt"
        )));
    }
    // The servers (postgres as its own user) read these.
    for name in [
        "ca.crt",
        "other-ca.crt",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
    ] {
        chmod(&dir.join(name), 0o644);
    }
}
