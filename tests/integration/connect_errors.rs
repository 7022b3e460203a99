//! Connection failures say what happened, in PostgreSQL's or the network's words, at once and
//! in one line with what to do: never a pool's timeout for a refusal, never the server's source
//! location, never a password.

use std::time::{Duration, Instant};

use migration::runner::{self, MigrateError, MigrateOptions};
use strategic_cache::CacheError;

use crate::support::db::{server_url, url_with_database};
use crate::support::repo::Repo;

/// `base` with its user replaced by `user:password`.
fn with_user(base: &str, user: &str) -> String {
    let (scheme, rest) = base.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:pw-not-shown@{host}")
}

fn assert_one_clean_line(message: &str) {
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(
        !message.contains("pw-not-shown"),
        "password shown: {message}"
    );
    assert!(
        !message.contains(" at line "),
        "server source location: {message}"
    );
}

/// A closed port is "connection refused" within a second, not a pool timeout seconds later.
#[tokio::test]
async fn refused_connection_is_said_at_once() {
    let url = "postgres://bot:pw-not-shown@127.0.0.1:9/app";
    let started = Instant::now();
    let error = Repo::at(url)
        .connect()
        .await
        .expect_err("nothing listens on port 9");
    let elapsed = started.elapsed();
    let message = error.to_string();
    assert!(matches!(error, CacheError::Unavailable(_)), "{message}");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}: {message}");
    assert!(message.contains("connection refused"), "{message}");
    assert!(
        message.contains("check them, and that the server is running"),
        "{message}"
    );
    assert!(!message.contains("timed out"), "{message}");
    assert_one_clean_line(&message);
}

/// An unknown role is named in PostgreSQL's words with its SQLSTATE and a hint.
#[tokio::test]
async fn unknown_role_is_named_without_the_servers_source_location() {
    let url = with_user(&server_url().await, "no_such_role_sc");
    let error = Repo::at(&url)
        .connect()
        .await
        .expect_err("the role does not exist");
    let message = error.to_string();
    assert!(
        message.contains("role \"no_such_role_sc\" does not exist (SQLSTATE 28000)"),
        "{message}"
    );
    assert!(message.contains("check the user name"), "{message}");
    assert_one_clean_line(&message);
}

/// A missing database fails `migrate` at once, saying so, and not "within 5s".
#[tokio::test]
async fn missing_database_is_named_and_not_called_a_timeout() {
    let url = url_with_database(&server_url().await, "no_such_database_sc");
    let started = Instant::now();
    let error = runner::connect(&url, &MigrateOptions::default())
        .await
        .expect_err("the database does not exist");
    let message = error.to_string();
    assert!(matches!(error, MigrateError::Unreachable(_)), "{message}");
    assert!(started.elapsed() < Duration::from_secs(1), "{message}");
    assert!(
        message.contains("database \"no_such_database_sc\" does not exist (SQLSTATE 3D000)"),
        "{message}"
    );
    assert!(message.contains("create the database"), "{message}");
    assert!(!message.contains("within"), "{message}");
    assert_one_clean_line(&message);
}

/// Through the command line, a wrong user is one line on stderr, exit 1, naming the database
/// once (without the password) and the role in PostgreSQL's words.
#[tokio::test]
async fn cli_names_the_database_once_and_the_role() {
    let url = with_user(&server_url().await, "no_such_role_cli");
    let result = crate::support::cli::run(
        None,
        &["get", "--database-url", &url, "--user", "u", "--bot", "b"],
        b"",
    )
    .await;
    assert_eq!(result.code, 1, "{result:#?}");
    let stderr = result.stderr.trim_end();
    assert_one_clean_line(stderr);
    let target = url.replace("pw-not-shown", "***");
    let target = target.split('?').next().unwrap();
    assert_eq!(stderr.matches(target).count(), 1, "the URL once: {stderr}");
    assert!(
        stderr.contains("role \"no_such_role_cli\" does not exist"),
        "{stderr}"
    );
}

/// `migrate` says a failed connection with the `cache database unavailable:` prefix every other
/// command uses, exit 1, one line; a refused password is "check the password in the URL" only
/// when the URL has one, and "the URL has no password" when it has none.
#[tokio::test]
async fn migrate_connection_errors_are_prefixed_and_say_whether_a_password_was_given() {
    let cluster = crate::support::cluster::PgCluster::start().await;
    cluster.migrated("cache").await;
    cluster.require_password("cache").await;
    let port = cluster.addr().port();
    let without = format!("postgres://postgres@127.0.0.1:{port}/cache");
    let with = format!("postgres://postgres:pw-not-shown@127.0.0.1:{port}/cache");
    for (url, hint, not_hint) in [
        (
            &without,
            "the URL has no password",
            "check the password in the URL",
        ),
        (
            &with,
            "check the password in the URL",
            "the URL has no password",
        ),
    ] {
        for command in [&["migrate", "status"][..], &["stats"][..]] {
            let mut args = vec!["--database-url", url.as_str()];
            args.extend_from_slice(command);
            let result = crate::support::cli::run(None, &args, b"").await;
            assert_eq!(result.code, 1, "{command:?} {result:#?}");
            let stderr = result.stderr.trim_end();
            assert_one_clean_line(stderr);
            assert!(
                stderr
                    .starts_with("strategic-cache: cache database unavailable: cannot connect to "),
                "{command:?}: {stderr}"
            );
            assert!(stderr.contains("SQLSTATE 28P01"), "{command:?}: {stderr}");
            assert!(stderr.contains(hint), "{command:?}: {stderr}");
            assert!(!stderr.contains(not_hint), "{command:?}: {stderr}");
        }
    }
}
