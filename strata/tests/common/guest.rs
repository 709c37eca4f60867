//! QEMU test guests (TCG): a busybox initramfs with the virtio and ext4 modules, fio,
//! mke2fs and e2fsck, built by scripts/guest.sh, running one script of tests/guest/ on a
//! vhost-user-blk disk and printing `STRATA-RESULT` / `STRATA-INFO` lines.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn guest_dir() -> PathBuf {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = PathBuf::from(
        std::env::var("STRATA_GUEST_DIR").unwrap_or_else(|_| "/var/tmp/strata-guest".into()),
    );
    let st = Command::new(repo().join("scripts/guest.sh"))
        .arg(&dir)
        .status()
        .expect("running scripts/guest.sh");
    assert!(
        st.success(),
        "building the test guest failed; see scripts/guest.sh output above"
    );
    dir
}

/// The QEMU command for a guest on `socket` running tests/guest/TEST.sh.
pub fn qemu(guest: &Path, socket: &Path, test: &str, queues: u16) -> Command {
    let mut c = Command::new("timeout");
    c.arg("600")
        .arg("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg,memory-backend=mem"])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-m",
            "512M",
            "-smp",
            "2",
        ])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initramfs.cpio"))
        .args([
            "-append",
            &format!("console=ttyS0 quiet panic=-1 strata.test={test}"),
        ])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .args([
            "-chardev",
            &format!("socket,id=c0,path={},reconnect=1", socket.display()),
        ])
        .args([
            "-device",
            &format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"),
        ])
        .stdin(Stdio::null());
    c
}

/// Boots a guest on `socket` running tests/guest/TEST.sh; returns its console output.
pub fn boot(guest: &Path, socket: &Path, test: &str, queues: u16) -> String {
    let out = qemu(guest, socket, test, queues)
        .output()
        .expect("qemu-system-x86_64 must be installed (scripts/setup.sh)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

pub fn assert_ok(out: &str, test: &str) {
    assert!(
        out.contains(&format!("STRATA-RESULT {test} OK")),
        "guest test {test} failed:\n{out}"
    );
}

pub fn info(out: &str, key: &str) -> String {
    out.lines()
        .filter(|l| l.contains("STRATA-INFO"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
        .unwrap_or_else(|| panic!("guest printed no {key}:\n{out}"))
}
