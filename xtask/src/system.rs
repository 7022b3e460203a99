//! Running programs, and installing Debian packages where this process may.

use std::cell::Cell;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `cmd` with inherited output; an error names the command and its exit status.
pub fn run(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Runs `program args` quietly and says whether it exited 0 (false if it cannot start).
pub fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The trimmed standard output of `program args`, if it exited 0.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    stdout_of(Command::new(program).args(args))
}

/// The trimmed standard output of `command` (stdin and stderr discarded), if it exited 0.
pub fn stdout_of(command: &mut Command) -> Option<String> {
    let out = command
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether `program` is on `PATH` (or is a path that exists).
pub fn has_program(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Whether this process may install Debian packages: root, with `apt-get` present.
pub fn can_install() -> bool {
    has_program("apt-get") && output("id", &["-u"]).as_deref() == Some("0")
}

thread_local! {
    static APT_UPDATED: Cell<bool> = const { Cell::new(false) };
}

/// Installs Debian `packages` (without recommends), running `apt-get update` once first.
///
/// Services that a package would start are kept from starting by `policy-rc.d` answering 101,
/// as it does on Debian's container images: the project starts what it needs itself, with its
/// own settings. A `policy-rc.d` that is already there is left as it is.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let placed = if policy.exists() {
        false
    } else {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")
            .and_then(|()| run_chmod_755(policy))
            .context("cannot write /usr/sbin/policy-rc.d")?;
        true
    };
    let result = (|| {
        if !APT_UPDATED.get() {
            let mut update = Command::new("apt-get");
            update.args(["update", "-qq"]);
            run(update)?;
            APT_UPDATED.set(true);
        }
        eprintln!("xtask: installing {} (apt-get)", packages.join(" "));
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null());
        run(install)
    })();
    if placed {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn run_chmod_755(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}
