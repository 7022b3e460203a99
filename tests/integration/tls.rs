//! TLS as libpq does it, against private clusters that refuse connections without TLS:
//! under `sslmode=prefer` and `require` the library (probe, sea-orm's pool, the read pool,
//! the near tier's listener) and the CLI connect to a server whose certificate is a
//! self-signed X.509 **version 1** (what `CREATE EXTENSION citus` generates, and what rustls
//! cannot parse) as well as to one with an ordinary version 3 certificate; `verify-ca` and
//! `verify-full` still verify, and say in one line why they refuse.
//!
//! Certificates are made here with the `openssl` crate (the driver links OpenSSL anyway), so
//! the tests need no `openssl` program.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509, X509NameBuilder};
use rstest::rstest;
use sea_orm::{ConnectionTrait, Statement};
use strategic_cache::prelude::*;
use strategic_cache::{
    CacheError, CacheReader, Component, Lookup, NearConfig, PgCacheRepository, PgConfig,
};

use crate::support::cli::run;
use crate::support::cluster::PgCluster;
use crate::support::db::connect;
use crate::support::fixtures::{key, mh};
use crate::support::repo::Repo;
use crate::support::timing::poll_until;

/// The password in every URL here: trust authentication ignores it, and no message may show it.
const PASSWORD: &str = "tls-s3cret";

/// Which X.509 version a test certificate has.
#[derive(Clone, Copy, Debug)]
enum Version {
    /// No extensions, as `openssl x509 -req -signkey` (and Citus) make it.
    V1,
    /// With a subjectAltName of `localhost` and `127.0.0.1`.
    V3,
}

/// A self-signed certificate for `localhost` and its key, both PEM.
struct SelfSigned {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl SelfSigned {
    fn new(version: Version) -> SelfSigned {
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "localhost").unwrap();
        let name = name.build();
        let mut builder = X509::builder().unwrap();
        // The field holds the version minus one.
        let field = match version {
            Version::V1 => 0,
            Version::V3 => 2,
        };
        builder.set_version(field).unwrap();
        builder
            .set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap())
            .unwrap();
        builder.set_subject_name(&name).unwrap();
        builder.set_issuer_name(&name).unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&Asn1Time::days_from_now(2).unwrap())
            .unwrap();
        if let Version::V3 = version {
            let san = SubjectAlternativeName::new()
                .dns("localhost")
                .ip("127.0.0.1")
                .build(&builder.x509v3_context(None, None))
                .unwrap();
            builder.append_extension(san).unwrap();
        }
        builder.sign(&key, MessageDigest::sha256()).unwrap();
        let cert = builder.build();
        assert_eq!(cert.version(), field, "the certificate's version field");
        SelfSigned {
            cert_pem: cert.to_pem().unwrap(),
            key_pem: key.private_key_to_pem_pkcs8().unwrap(),
        }
    }
}

/// A file removed on drop (a root certificate the URL names).
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &[u8]) -> TempFile {
        static FILES: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "sc-tls-{}-{}.crt",
            std::process::id(),
            FILES.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A private cluster with the cache tables migrated in database `cache`, then restarted to
/// accept connections to `cache` over TLS only, with `cert` as the server's certificate.
async fn tls_only_cluster(cert: &SelfSigned) -> PgCluster {
    let cluster = PgCluster::start().await;
    cluster.migrated("cache").await;
    cluster.require_tls(&cert.cert_pem, &cert.key_pem).await;
    cluster
}

/// The URL of database `cache` on `cluster`, with a password and `query`.
fn cache_url(cluster: &PgCluster, query: &str) -> String {
    format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/cache?{query}",
        cluster.addr().port()
    )
}

/// Backends connected to database `cache`, with and without TLS (`pg_stat_ssl`), seen from an
/// unencrypted admin connection.
async fn backends_by_tls(cluster: &PgCluster) -> (i64, i64) {
    let admin = connect(&format!("{}?sslmode=disable", cluster.url("postgres"))).await;
    let row = admin
        .query_one_raw(Statement::from_string(
            admin.get_database_backend(),
            "SELECT count(*) FILTER (WHERE s.ssl) AS tls, count(*) FILTER (WHERE NOT s.ssl) AS plain \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = 'cache'",
        ))
        .await
        .unwrap()
        .unwrap();
    let counts = (
        row.try_get::<i64>("", "tls").unwrap(),
        row.try_get::<i64>("", "plain").unwrap(),
    );
    let _ = admin.close().await;
    counts
}

/// Under prefer and require, with a version 1 or 3 certificate, the repository connects over TLS, writes and reads, and a near-tier reader holds its lease.
#[rstest]
#[case::v1_prefer(Version::V1, "prefer")]
#[case::v1_require(Version::V1, "require")]
#[case::v3_prefer(Version::V3, "prefer")]
#[case::v3_require(Version::V3, "require")]
#[tokio::test]
async fn repository_and_near_tier_connect_over_tls(
    #[case] version: Version,
    #[case] sslmode: &str,
) {
    let cert = SelfSigned::new(version);
    let cluster = tls_only_cluster(&cert).await;
    let url = cache_url(&cluster, &format!("sslmode={sslmode}"));

    let repo = Repo::at(&url)
        .with(|c| {
            c.max_connections = 2;
            c.min_connections = 1;
        })
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{version:?} certificate, sslmode={sslmode}: {e}"));
    repo.upsert(&mh("u1", "elena", 1.0, 0)).await.unwrap();
    let key = key(Component::MemoryHealth, "u1", "elena");
    // Through the read pool (`lookup`) and through sea-orm's pool (`get`).
    assert!(
        matches!(
            repo.lookup(Component::MemoryHealth, &key).await.unwrap(),
            Lookup::Fresh(_)
        ),
        "the entry just written is not fresh"
    );
    assert!(
        repo.get(Component::MemoryHealth, &key)
            .await
            .unwrap()
            .is_some()
    );

    let near =
        PgCacheRepository::near_tier_at(&url, Arc::new(repo.clone()), &NearConfig::default())
            .unwrap();
    let reader = CacheReader::new(Arc::new(repo)).with_near(near);
    let leased = poll_until(Duration::from_secs(10), || async {
        reader
            .get(Component::MemoryHealth, "u1", "elena")
            .await
            .is_some()
            && reader.near_stats().is_some_and(|s| s.lease_valid)
    })
    .await;
    assert!(
        leased.is_some(),
        "the near tier never held its lease over TLS: {:?}",
        reader.near_stats()
    );

    // The probe's connection is closed; the pool's, the read pool's and the listener's are open.
    let (tls, plain) = backends_by_tls(&cluster).await;
    assert_eq!(plain, 0, "backends without TLS");
    assert!(tls >= 3, "only {tls} backends over TLS");
}

/// The CLI runs `migrate status`, `put` and `get` under sslmode=require and prefer against a server with a version 1 certificate.
#[tokio::test]
async fn cli_connects_over_tls_to_a_version_1_certificate() {
    let cert = SelfSigned::new(Version::V1);
    let cluster = tls_only_cluster(&cert).await;
    for sslmode in ["require", "prefer"] {
        let url = cache_url(&cluster, &format!("sslmode={sslmode}"));
        let url = Some(url.as_str());
        run(url, &["migrate", "status"], b"")
            .await
            .expect_code(0, &format!("migrate status, sslmode={sslmode}"));
        let put = [
            "put",
            "--component",
            "memory_health",
            "--user",
            "u1",
            "--bot",
            "elena",
        ];
        run(url, &put, br#"{"memory_snapshot": ["tls"]}"#)
            .await
            .expect_code(0, &format!("put, sslmode={sslmode}"));
        let get = run(
            url,
            &[
                "--json",
                "get",
                "--user",
                "u1",
                "--bot",
                "elena",
                "--component",
                "memory_health",
            ],
            b"",
        )
        .await;
        get.expect_code(0, &format!("get, sslmode={sslmode}"));
        assert!(get.stdout.contains("tls"), "{get:#?}");
    }
}

/// Under sslmode=require and prefer the CLI never opens the CA bundle: with `SSL_CERT_FILE` a FIFO nobody writes to (opening it would block for good), `migrate status` still succeeds.
#[tokio::test]
async fn unverified_tls_loads_no_ca_bundle() {
    let cert = SelfSigned::new(Version::V1);
    let cluster = tls_only_cluster(&cert).await;
    // A FIFO rather than a missing or garbage file: OpenSSL and native-tls ignore a bundle they
    // cannot load, but opening a FIFO without a writer blocks, so any attempt to read it shows.
    let fifo =
        TempFile(std::env::temp_dir().join(format!("sc-tls-{}-fifo.pem", std::process::id())));
    let _ = std::fs::remove_file(fifo.path());
    let made = std::process::Command::new("mkfifo")
        .arg(fifo.path())
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", fifo.path().display());
    let empty_dir = std::env::temp_dir().join(format!("sc-tls-{}-no-certs", std::process::id()));
    std::fs::create_dir_all(&empty_dir).unwrap();
    for sslmode in ["require", "prefer"] {
        let url = cache_url(&cluster, &format!("sslmode={sslmode}"));
        let child = tokio::process::Command::new(crate::support::cli::binary())
            .args(["--database-url", &url, "migrate", "status"])
            .env("SSL_CERT_FILE", fifo.path())
            .env("SSL_CERT_DIR", &empty_dir)
            .env_remove("DATABASE_URL")
            .env_remove("STRATEGIC_CACHE_REPLICAS")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("sslmode={sslmode}: the CLI blocked opening SSL_CERT_FILE"))
            .unwrap();
        assert!(
            output.status.success(),
            "sslmode={sslmode}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let _ = std::fs::remove_dir(&empty_dir);
}

/// verify-ca accepts the server's own version 1 certificate as root; verify-full refuses it on a host it does not name, and both refuse a wrong root, in one line without the password.
#[tokio::test]
async fn verify_modes_still_verify() {
    let cert = SelfSigned::new(Version::V1);
    let cluster = tls_only_cluster(&cert).await;
    let right_root = TempFile::new(&cert.cert_pem);
    let wrong_root = TempFile::new(&SelfSigned::new(Version::V1).cert_pem);
    let config = PgConfig {
        max_connections: 1,
        min_connections: 1,
        connect_timeout: Duration::from_secs(5),
        ..PgConfig::default()
    };
    let with = |mode: &str, root: &TempFile| {
        cache_url(
            &cluster,
            &format!("sslmode={mode}&sslrootcert={}", root.path().display()),
        )
    };

    // The root is right and verify-ca does not check the name: it connects.
    let repo = Repo::at(&with("verify-ca", &right_root))
        .config(config.clone())
        .connect()
        .await
        .unwrap_or_else(|e| panic!("verify-ca with the server's certificate as root: {e}"));
    drop(repo);

    let refusals = [
        ("verify-full", &right_root, "right", "address mismatch"),
        (
            "verify-full",
            &wrong_root,
            "wrong",
            "certificate verify failed",
        ),
        (
            "verify-ca",
            &wrong_root,
            "wrong",
            "certificate verify failed",
        ),
    ];
    for (mode, root, which, says) in refusals {
        let what = format!("{mode} with the {which} root");
        let url = with(mode, root);
        let error = Repo::at(&url)
            .config(config.clone())
            .connect()
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: connected"));
        assert!(
            matches!(error, CacheError::Unavailable(_)),
            "{what}: {error:?}"
        );
        let message = error.to_string();
        assert_eq!(message.lines().count(), 1, "{what}: {message}");
        assert!(
            message.contains(says),
            "{what}: does not say `{says}`: {message}"
        );
        assert!(
            !message.contains(PASSWORD),
            "{what}: shows the password: {message}"
        );
        assert!(
            !message.contains(".c:"),
            "{what}: shows OpenSSL's source: {message}"
        );

        let cli = run(Some(&url), &["migrate", "status"], b"").await;
        cli.expect_code(1, &what);
        let lines: Vec<&str> = cli.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: {cli:#?}");
        assert!(lines[0].contains(says), "{what}: {cli:#?}");
        assert!(!cli.stderr.contains(PASSWORD), "{what}: {cli:#?}");
    }
}

/// verify-full connects to a version 3 certificate that names 127.0.0.1, given as root.
#[tokio::test]
async fn verify_full_accepts_a_certificate_naming_the_host() {
    let cert = SelfSigned::new(Version::V3);
    let cluster = tls_only_cluster(&cert).await;
    let root = TempFile::new(&cert.cert_pem);
    let url = cache_url(
        &cluster,
        &format!("sslmode=verify-full&sslrootcert={}", root.path().display()),
    );
    let repo = Repo::at(&url)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("verify-full: {e}"));
    repo.upsert(&mh("u1", "elena", 1.0, 0)).await.unwrap();
    let (tls, plain) = backends_by_tls(&cluster).await;
    assert_eq!(plain, 0, "backends without TLS");
    assert!(tls >= 1);
}
