//! A real S3 server for the remote tests and benchmarks: Garage (2.5.0) on loopback, as a
//! single node or as a three-node cluster with replication factor 3. `scripts/setup.sh`
//! installs the binary to `/var/tmp/strata-tools/bin/garage` (`STRATA_GARAGE` overrides);
//! a missing binary fails the caller loudly.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KEY_ID: &str = "GK0123456789abcdef01234567";
pub const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
pub const BUCKET: &str = "strata-test";
pub const REGION: &str = "garage";
const RPC_SECRET: &str = "4f1c0a9e3b7d2c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60";

pub fn binary() -> PathBuf {
    let p = std::env::var_os("STRATA_GARAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/strata-tools/bin/garage"));
    assert!(
        p.is_file(),
        "garage not found at {} (scripts/setup.sh installs it; STRATA_GARAGE overrides)",
        p.display()
    );
    p
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

#[derive(Debug)]
pub struct Node {
    pub config: PathBuf,
    pub s3_port: u16,
    pub rpc_port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    fn new(dir: &Path, replication: u32) -> Node {
        std::fs::create_dir_all(dir).expect("garage dir");
        let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = {replication}
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{RPC_SECRET}"
[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
"#,
                d = dir.display()
            ),
        )
        .expect("garage config");
        Node {
            config,
            s3_port,
            rpc_port,
            child: None,
            log: dir.join("garage.log"),
        }
    }

    fn start(&mut self, single: bool) {
        let log = std::fs::File::create(&self.log).expect("garage log");
        let mut cmd = Command::new(binary());
        cmd.arg("-c").arg(&self.config).arg("server");
        if single {
            cmd.args(["--single-node", "--default-bucket"])
                .env("GARAGE_DEFAULT_ACCESS_KEY", KEY_ID)
                .env("GARAGE_DEFAULT_SECRET_KEY", SECRET)
                .env("GARAGE_DEFAULT_BUCKET", BUCKET);
        }
        let child = cmd
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting garage");
        self.child = Some(child);
    }

    /// Stops the node (SIGKILL: a node that dies).
    /// The node's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(binary())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("running garage");
        assert!(
            out.status.success(),
            "garage {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Garage on loopback: one node, or three with replication factor 3.
#[derive(Debug)]
pub struct Garage {
    pub nodes: Vec<Node>,
}

impl Garage {
    /// A single node with the test key and bucket, ready for S3 requests.
    pub fn single(dir: &Path) -> Garage {
        let mut n = Node::new(dir, 1);
        n.start(true);
        let g = Garage { nodes: vec![n] };
        g.wait_ready();
        g
    }

    /// Three nodes, replication factor 3, the test key and bucket.
    pub fn cluster3(dir: &Path) -> Garage {
        let mut nodes: Vec<Node> = (0..3)
            .map(|i| Node::new(&dir.join(format!("node{i}")), 3))
            .collect();
        for n in &mut nodes {
            n.start(false);
        }
        let ids: Vec<String> = nodes
            .iter()
            .map(|n| {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let out = Command::new(binary())
                        .arg("-c")
                        .arg(&n.config)
                        .args(["node", "id", "-q"])
                        .output()
                        .expect("garage node id");
                    if out.status.success() {
                        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
                        break s.split('@').next().unwrap_or_default().to_string();
                    }
                    assert!(
                        Instant::now() < deadline,
                        "garage node did not start: {}",
                        n.log_text()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
            .collect();
        // `node id` answers from the key file, possibly before the node listens for RPC:
        // connecting is retried until it does.
        for (i, n) in nodes.iter().enumerate().skip(1) {
            let target = format!("{}@127.0.0.1:{}", ids[i], n.rpc_port);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let out = Command::new(binary())
                    .arg("-c")
                    .arg(&nodes[0].config)
                    .args(["node", "connect", &target])
                    .output()
                    .expect("running garage");
                if out.status.success() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "garage node connect {target}: {}{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    n.log_text()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for id in &ids {
            nodes[0].cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id[..16]]);
        }
        nodes[0].cli(&["layout", "apply", "--version", "1"]);
        nodes[0].cli(&["key", "import", "--yes", "-n", "strata", KEY_ID, SECRET]);
        nodes[0].cli(&["bucket", "create", BUCKET]);
        nodes[0].cli(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "strata",
        ]);
        let g = Garage { nodes };
        g.wait_ready();
        g
    }

    pub fn endpoint(&self) -> String {
        self.nodes[0].endpoint()
    }

    /// Starts a single node again after [`Node::kill`] (a remote that comes back), with
    /// its data.
    pub fn restart_single(&mut self) {
        self.nodes[0].start(true);
        self.wait_ready();
    }

    /// Writes the test key to `path` as a credentials file for `strata remote add
    /// --credentials-file` (readable by its owner only, as the daemon requires).
    pub fn credentials_file(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            path,
            format!("access_key_id = {KEY_ID}\nsecret_access_key = {SECRET}\n"),
        )
        .expect("writing the credentials file");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .expect("making the credentials file private");
    }

    /// The arguments of `strata remote add NAME ...` for this server's test bucket, with
    /// credentials in `creds` (written by [`Garage::credentials_file`]).
    pub fn remote_add_args(&self, name: &str, creds: &Path) -> Vec<String> {
        [
            "remote",
            "add",
            name,
            "--endpoint",
            &self.endpoint(),
            "--bucket",
            BUCKET,
            "--region",
            REGION,
            "--credentials-file",
            creds.to_str().expect("a UTF-8 path"),
        ]
        .map(String::from)
        .to_vec()
    }

    /// Waits until the S3 API answers an authenticated request for the bucket.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = self.nodes.iter().all(|n| {
                Command::new(binary())
                    .arg("-c")
                    .arg(&n.config)
                    .args(["bucket", "info", BUCKET])
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "garage did not become ready: {}",
                self.nodes[0].log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
