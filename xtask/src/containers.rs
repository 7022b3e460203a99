//! The testcontainers path: a container engine, a PostgreSQL image, and removing the test
//! containers afterwards.
//!
//! Where `docker info` already works (a laptop with Docker), nothing is installed or started.
//! Otherwise, on Debian as root (CI, the project's machines), Debian's `docker.io` is installed
//! and `dockerd` started with [`DAEMON_CONFIG`]: no bridge, no firewall rules, no address
//! forwarding. The test containers use the host's network and listen on loopback, so the run
//! changes neither `ip addr` nor `iptables -S`.
//!
//! No container registry is reachable from these machines, so the image is built here from the
//! host's own PostgreSQL server files (the libraries `ldd` names, `dash` as `/bin/sh`, and a
//! cluster created at build time) into `FROM scratch`, tagged under `localhost/` so that a
//! missing image fails at once instead of being looked up on Docker Hub.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::system;

/// The variable naming the image the tests run (read by `tests/integration`'s fixture).
pub const IMAGE_ENV: &str = "STRATEGIC_CACHE_TEST_IMAGE";
/// The repository of the locally built image; the tag is the PostgreSQL major version.
const LOCAL_REPO: &str = "localhost/strategic-cache/postgres";
/// The label every test container carries (set by the fixture).
const LABEL: &str = "strategic-cache.test";

/// `dockerd`'s settings when this task starts it: host networking only, nothing in the
/// firewall, nothing forwarded.
const DAEMON_CONFIG: &str = r#"{"bridge":"none","iptables":false,"ip6tables":false,"ip-forward":false,"ip-masq":false,"userland-proxy":false}"#;

/// The image: the root file system built below, the server run as the user that owns the
/// cluster, and SIGINT (PostgreSQL's fast shutdown) to stop it.
const DOCKERFILE: &str = "\
FROM scratch
ADD rootfs.tar /
LABEL org.opencontainers.image.description=\"PostgreSQL for the strategic-cache tests, built from the host's packages\"
USER postgres
ENV PATH=/usr/lib/postgresql/VERSION/bin PGDATA=/var/lib/postgresql/data TZ=UTC
STOPSIGNAL SIGINT
CMD [\"postgres\"]
";

/// Added to the cluster's `postgresql.conf`. Durability is off because the data is thrown
/// away with the container; the port comes from `PGPORT`, which the fixture sets.
const POSTGRESQL_CONF: &str = "
# strategic-cache test image: loopback only, durability off (the data dies with the container).
listen_addresses = '127.0.0.1'
unix_socket_directories = '/tmp'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
jit = off
";

const PG_HBA: &str = "\
local all all trust
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
";

/// `cargo xtask containers [prepare|clean|stop]`.
pub fn task(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        None | Some("prepare") => {
            let started = Instant::now();
            // Kept running: that is what this step is for (`cargo xtask containers stop`).
            let (image, _) = prepare()?;
            eprintln!(
                "xtask: container engine up, image {image} ready ({:.1} s; `cargo xtask containers stop` stops it)",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Some("clean") => clean(),
        Some("stop") => stop(),
        Some(other) => bail!("unknown containers step `{other}` (prepare, clean or stop)"),
    }
}

/// Makes sure an engine runs and an image is there; returns the image the tests should use
/// and whether the engine was started here.
pub fn prepare() -> Result<(String, bool)> {
    let started = ensure_engine()?;
    Ok((ensure_image()?, started))
}

/// The highest PostgreSQL major version whose server programs are installed (Debian layout).
pub fn host_postgres() -> Option<String> {
    let entries = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().join("bin/postgres").is_file())
        .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
        .max_by_key(|version| version.parse::<u32>().unwrap_or(0))
}

pub fn engine_up() -> bool {
    system::succeeds("docker", &["info"])
}

/// Whether it started the engine (false: one was running).
fn ensure_engine() -> Result<bool> {
    if engine_up() {
        return Ok(false);
    }
    let no_engine = "no container engine: `docker info` fails";
    let alternative =
        "or set DATABASE_URL=postgres://USER@HOST:PORT/postgres to use a running server";
    if !system::can_install() {
        bail!("{no_engine}; start Docker, {alternative}");
    }
    if !system::has_program("dockerd") || !system::has_program("docker") {
        system::apt_install(&["docker.io"])?;
    }
    start_dockerd()?;
    Ok(true)
}

/// Where this task keeps the files of the daemon it starts.
fn state_dir() -> PathBuf {
    crate::project_root().join("target/xtask")
}

fn start_dockerd() -> Result<()> {
    let dir = state_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join("daemon.json");
    std::fs::write(&config, DAEMON_CONFIG)?;
    let log_path = dir.join("dockerd.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new("dockerd")
        .arg("--config-file")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group, so that a Ctrl-C of the tests does not kill it mid-cleanup;
        // `cargo xtask test` stops it at the end unless --keep-engine, and
        // `cargo xtask containers stop` stops a kept one.
        .process_group(0)
        .spawn()
        .context("cannot start dockerd")?;
    std::fs::write(dir.join("dockerd.pid"), child.id().to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !engine_up() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "dockerd exited ({status}) before it was ready; its log is {}",
                log_path.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "dockerd did not answer within 60 s; its log is {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "xtask: started dockerd (no bridge, no firewall rules; log {})",
        log_path.display()
    );
    Ok(())
}

fn image_present(image: &str) -> bool {
    system::succeeds("docker", &["image", "inspect", image])
}

fn ensure_image() -> Result<String> {
    let wanted = std::env::var(IMAGE_ENV)
        .ok()
        .filter(|image| !image.is_empty());
    if let Some(image) = &wanted
        && (image_present(image) || !image.starts_with(LOCAL_REPO))
    {
        // Present, or someone else's image that testcontainers will pull.
        return Ok(image.clone());
    }
    let Some(version) = host_postgres() else {
        bail!(
            "no PostgreSQL image: the local one is built from this machine's PostgreSQL server \
             programs, which are not installed (Debian: apt-get install postgresql); or set \
             {IMAGE_ENV} to an image your engine can pull, or set DATABASE_URL"
        );
    };
    let tag = format!("{LOCAL_REPO}:{version}");
    if let Some(image) = &wanted
        && *image != tag
    {
        bail!("{IMAGE_ENV}={image} is not built here; this machine can build {tag}");
    }
    if !image_present(&tag) {
        let started = Instant::now();
        build_image(&version, &tag)?;
        eprintln!(
            "xtask: built {tag} from the host's PostgreSQL {version} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(tag)
}

/// The user the cluster belongs to: `postgres` when building as root (initdb refuses to run as
/// root), else whoever runs this. Returns (run initdb through runuser, uid, gid).
fn cluster_owner() -> Result<(bool, String, String)> {
    let me = system::output("id", &["-u"]).unwrap_or_default();
    if me == "0" {
        let uid = system::output("id", &["-u", "postgres"])
            .context("building the image as root needs the `postgres` user (Debian's postgresql-common creates it)")?;
        let gid = system::output("id", &["-g", "postgres"]).unwrap_or_else(|| uid.clone());
        Ok((true, uid, gid))
    } else {
        let gid = system::output("id", &["-g"]).unwrap_or_else(|| me.clone());
        Ok((false, me, gid))
    }
}

fn build_image(version: &str, tag: &str) -> Result<()> {
    let work = std::env::temp_dir().join(format!("strategic-cache-image-{}", std::process::id()));
    let result = build_image_in(&work, version, tag);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn build_image_in(work: &Path, version: &str, tag: &str) -> Result<()> {
    let rootfs = work.join("rootfs");
    let context = work.join("context");
    std::fs::create_dir_all(&rootfs)?;
    std::fs::create_dir_all(&context)?;
    // The work directory must be reachable by the cluster's owner for initdb.
    system::run({
        let mut chmod = Command::new("chmod");
        chmod.arg("755").arg(work).arg(&rootfs);
        chmod
    })?;

    let lib = format!("/usr/lib/postgresql/{version}");
    let share = format!("/usr/share/postgresql/{version}");
    let mut trees = vec![lib.clone(), share, "/usr/share/zoneinfo".to_owned()];
    let c_utf8 = Path::new("/usr/lib/locale/C.utf8");
    if c_utf8.exists() {
        trees.push(c_utf8.display().to_string());
    }
    for tree in &trees {
        copy_with_parents(&["-a"], tree, &rootfs)?;
    }
    // Without the JIT: its LLVM libraries would more than double the image, and the tests'
    // queries are far below the JIT's cost thresholds anyway (`jit = off` below).
    let copied_lib = rootfs.join(lib.trim_start_matches('/'));
    let _ = std::fs::remove_dir_all(copied_lib.join("lib/bitcode"));
    for entry in std::fs::read_dir(copied_lib.join("lib"))? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("llvmjit"))
        {
            std::fs::remove_file(path)?;
        }
    }
    for library in shared_libraries(&copied_lib)? {
        copy_with_parents(&["-L"], &library, &rootfs)?;
    }
    // `/bin/sh` for the commands initdb and the server run: the host's dash.
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy("/bin/dash", rootfs.join("bin/dash")).context("cannot copy /bin/dash")?;
    std::os::unix::fs::symlink("dash", rootfs.join("bin/sh"))?;

    let (as_postgres, uid, gid) = cluster_owner()?;
    for dir in ["etc", "tmp", "var/run/postgresql", "var/lib/postgresql"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        format!(
            "root:x:0:0:root:/root:/bin/sh\npostgres:x:{uid}:{gid}:PostgreSQL:/var/lib/postgresql:/bin/sh\n"
        ),
    )?;
    std::fs::write(
        rootfs.join("etc/group"),
        format!("root:x:0:\npostgres:x:{gid}:\n"),
    )?;
    system::run({
        let mut chmod = Command::new("chmod");
        chmod.arg("1777").arg(rootfs.join("tmp"));
        chmod
    })?;
    if as_postgres {
        let mut chown = Command::new("chown");
        chown
            .args(["-R", &format!("{uid}:{gid}")])
            .arg(rootfs.join("var/lib/postgresql"))
            .arg(rootfs.join("var/run/postgresql"));
        system::run(chown)?;
    }

    let data = rootfs.join("var/lib/postgresql/data");
    let initdb = format!("{lib}/bin/initdb");
    let mut cmd = if as_postgres {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--", &initdb]);
        cmd
    } else {
        Command::new(&initdb)
    };
    cmd.arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8"])
        .arg(if c_utf8.exists() {
            "--locale=C.UTF-8"
        } else {
            "--no-locale"
        })
        .env("TZ", "UTC")
        .stdout(Stdio::null());
    system::run(cmd).context("initdb for the image's cluster failed")?;
    let conf = data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf)?;
    text.push_str(POSTGRESQL_CONF);
    std::fs::write(&conf, text)?;
    std::fs::write(data.join("pg_hba.conf"), PG_HBA)?;

    let mut tar = Command::new("tar");
    tar.arg("-C")
        .arg(&rootfs)
        .args(["--numeric-owner", "-cf"])
        .arg(context.join("rootfs.tar"))
        .arg(".");
    system::run(tar)?;
    std::fs::write(
        context.join("Dockerfile"),
        DOCKERFILE.replace("VERSION", version),
    )?;
    let mut build = Command::new("docker");
    // The classic builder: it needs no BuildKit components, which Debian packages apart.
    build
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", tag])
        .arg(&context)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    system::run(build).with_context(|| format!("docker build of {tag} failed"))
}

/// `cp FLAGS --parents SOURCE .` in DEST: SOURCE at its own path below DEST. The parent
/// directories are made first, with ordinary permissions: coreutils 9.1's `cp --parents` makes
/// them `0700`, which the server's user could not traverse. (It is run from DEST because the
/// same `cp -a --parents` fails with an absolute destination.)
fn copy_with_parents(flags: &[&str], source: &str, dest: &Path) -> Result<()> {
    if let Some(parent) = Path::new(source).parent() {
        std::fs::create_dir_all(dest.join(parent.strip_prefix("/").unwrap_or(parent)))?;
    }
    let mut cp = Command::new("cp");
    cp.args(flags)
        .arg("--parents")
        .arg(source)
        .arg(".")
        .current_dir(dest);
    system::run(cp)
}

/// Every shared library that `ldd` finds for the files below `dir` (programs and modules).
fn shared_libraries(dir: &Path) -> Result<BTreeSet<String>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    let mut libraries = BTreeSet::new();
    for file in files {
        let Ok(out) = Command::new("ldd")
            .arg(&file)
            .stderr(Stdio::null())
            .output()
        else {
            continue;
        };
        for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if word.starts_with('/') && Path::new(word).exists() {
                libraries.insert(word.to_owned());
            }
        }
    }
    Ok(libraries)
}

/// Removes every container that carries the test label, saying which.
pub fn clean() -> Result<()> {
    if !engine_up() {
        return Ok(());
    }
    let filter = format!("label={LABEL}");
    let listed = system::output(
        "docker",
        &[
            "ps",
            "-a",
            "--filter",
            &filter,
            "--format",
            "{{.ID}} {{.Image}} {{.Status}}",
        ],
    )
    .unwrap_or_default();
    let ids: Vec<&str> = listed
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    for line in listed.lines() {
        eprintln!("xtask: removing test container {line}");
    }
    let mut rm = Command::new("docker");
    rm.args(["rm", "-f", "-v"]).args(&ids).stdout(Stdio::null());
    system::run(rm)
}

/// Stops the `dockerd` this task started (removing the test containers first), and unmounts
/// the network-namespace file it leaves mounted under its run directory.
pub fn stop() -> Result<()> {
    clean()?;
    let pid_file = state_dir().join("dockerd.pid");
    let Ok(pid) = std::fs::read_to_string(&pid_file) else {
        eprintln!("xtask: no dockerd started by `cargo xtask` is known; nothing to stop");
        return Ok(());
    };
    let pid = pid.trim().to_owned();
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if proc_dir.exists() {
        system::run({
            let mut kill = Command::new("kill");
            kill.args(["-TERM", &pid]);
            kill
        })?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while proc_dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if proc_dir.exists() {
            bail!("dockerd (pid {pid}) did not stop within 30 s");
        }
        eprintln!("xtask: stopped dockerd (pid {pid})");
    }
    let _ = std::fs::remove_file(&pid_file);
    let netns = "/run/docker/netns/default";
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(netns))
    {
        let mut umount = Command::new("umount");
        umount.arg(netns);
        system::run(umount)?;
    }
    Ok(())
}
