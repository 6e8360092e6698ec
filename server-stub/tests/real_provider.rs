//! `serve --provider real` with a stand-in QEMU (a shell loop named
//! `qemu-system-x86_64`, first on the server's PATH) and, where a test needs QEMU to
//! say something, the test itself on the VM's QMP event socket: VMs outlive the
//! server and the next one adopts them; a reset in place is a reboot, not a death,
//! and a reboot loop is stopped. The VM tier does the same with real QEMU
//! (`tests/tests/vm_provider.rs`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::process::{alive, cli_json, fake_image, vm_pid, wait_until, ServerProc};
use common::FakeNode;
use powernode_proto::IdentityDocument;
use reqwest::StatusCode;
use serde_json::Value;

/// A data directory, an image folder and a stand-in QEMU, for servers started and
/// restarted on them.
struct StandIn {
    tmp: tempfile::TempDir,
    data: PathBuf,
    images: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl StandIn {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let images = tmp.path().join("images");
        fake_image(&images);
        let bin = tmp.path().join("bin");
        let sockets = tmp.path().join("tmp");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&sockets).unwrap();
        let fake = bin.join("qemu-system-x86_64");
        std::fs::write(&fake, "#!/bin/sh\nwhile :; do sleep 1; done\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = vec![
            (
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            ),
            ("POWERNODE_ACCEL", "tcg".to_string()),
            // The QMP sockets go here, where the test can find them.
            ("TMPDIR", sockets.to_string_lossy().into_owned()),
        ];
        Self {
            data: tmp.path().join("data"),
            images,
            env,
            tmp,
        }
    }

    fn start(&self) -> ServerProc {
        let images = self.images.to_str().unwrap();
        ServerProc::start_env(&self.data, "real", &["--image-base", images], &self.env)
    }

    /// Creates a node and provisions it; returns the instance and its QEMU pid.
    fn provision(&self, hostname: &str, class: &str) -> (String, u64) {
        let node = cli_json(
            &self.data,
            &[
                "create-node",
                "--hostname",
                hostname,
                "--lifecycle-class",
                class,
            ],
        );
        let node_id = node["node"]["id"].as_str().unwrap().to_string();
        let prov = cli_json(&self.data, &["provision-instance", &node_id]);
        let inst = prov["instance"]["id"].as_str().unwrap().to_string();
        let pid = vm_pid(&self.data, &inst);
        (inst, pid)
    }

    fn instance(&self, inst: &str) -> Value {
        cli_json(&self.data, &["get-instance", inst])["instance"].clone()
    }

    fn events(&self, inst: &str, kind: &str) -> Vec<Value> {
        cli_json(&self.data, &["recent-events", "--instance", inst])["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind)
            .cloned()
            .collect()
    }

    /// The VM's QMP event socket, as the server computes it under its TMPDIR.
    fn events_socket(&self, inst: &str) -> PathBuf {
        self.tmp
            .path()
            .join("tmp")
            .join(format!("powernode-qmp-{inst}.events.sock"))
    }
}

fn kill9(pid: u64) {
    let ok = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -KILL {pid}");
}

/// Plays QEMU's side of a QMP event socket at `path`: greets the one client (the
/// server's watcher), answers its capabilities negotiation, then writes each line
/// sent on the returned channel.
fn qmp_events(path: &Path) -> std::sync::mpsc::Sender<String> {
    let listener = UnixListener::bind(path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("qmp_capabilities"), "{line}");
        s.write_all(b"{\"return\": {}}\n").unwrap();
        while let Ok(ev) = rx.recv() {
            if s.write_all(ev.as_bytes()).is_err() {
                return;
            }
        }
    });
    tx
}

/// A guest's `RESET` as QEMU stamps it, `ms` after some start.
fn guest_reset(ms: u64) -> String {
    format!(
        "{{\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": \"RESET\", \
         \"data\": {{\"guest\": true, \"reason\": \"guest-reset\"}}}}\n",
        1_700_000_000 + ms / 1000,
        (ms % 1000) * 1000
    )
}

/// A clean stop (SIGTERM) and a SIGKILL both leave the VM running, and the next
/// server on the same data directory takes it back (`vm.adopted`): the instance
/// lives on, an adopted VM that dies is noticed, terminate kills an adopted VM. A VM
/// that died while no server watched is `vm.lost`. The test's guards still kill
/// every VM of a server they drop.
#[test]
fn real_provider_vms_outlive_the_server_and_the_next_one_adopts_them() {
    let f = StandIn::new();
    // Guards of stopped servers: they kill what is left of their sessions (the VMs
    // the next server adopted) when the test ends.
    let mut stopped = Vec::new();
    let mut server = f.start();

    // Persistent: a /persist disk, and terminate kills the VM by its pid.
    let (p_inst, p_pid) = f.provision("edge-p", "persistent");
    assert!(alive(p_pid));
    let disk = f.images.join("instances").join(&p_inst).join("persist.img");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1024 << 20);
    let cmd = std::fs::read_to_string(disk.with_file_name("qemu-command.sh")).unwrap();
    assert!(cmd.contains("-m 512 -smp 1"), "{cmd}");
    assert!(cmd.contains("id=persist"), "{cmd}");
    let t = cli_json(&f.data, &["terminate-instance", &p_inst]);
    assert_eq!(t["status"], "terminated");
    assert!(!alive(p_pid), "terminate left the VM running");

    // A clean stop leaves the VM running; the next server adopts it.
    let (e_inst, e_pid) = f.provision("edge-e", "ephemeral");
    assert_eq!(f.instance(&e_inst)["status"], "provisioning");
    assert!(server.signal("-TERM").success());
    assert!(alive(e_pid), "a clean stop of the server killed its VM");
    stopped.push(std::mem::replace(&mut server, f.start()));
    let i = f.instance(&e_inst);
    assert_eq!(i["status"], "provisioning", "{i}");
    let adopted = f.events(&e_inst, "vm.adopted");
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert_eq!(adopted[0]["detail"]["pid"], e_pid, "{adopted:?}");
    assert!(f.events(&e_inst, "vm.lost").is_empty());

    // So does a SIGKILL, and an adopted VM is adopted again.
    server.signal("-KILL");
    assert!(alive(e_pid));
    stopped.push(std::mem::replace(&mut server, f.start()));
    assert_eq!(f.instance(&e_inst)["status"], "provisioning");
    assert_eq!(f.events(&e_inst, "vm.adopted").len(), 2);

    // An adopted VM is watched: one killed behind the server's back fails it.
    kill9(e_pid);
    wait_until("the adopted VM's death noticed", 10, || {
        f.instance(&e_inst)["status"] == "failed"
    });
    let i = f.instance(&e_inst);
    let msg = i["failure"]["message"].as_str().unwrap();
    assert!(
        msg.contains("exited on its own") && msg.contains(&e_pid.to_string()),
        "{msg}"
    );

    // Terminate kills an adopted VM.
    let (k_inst, k_pid) = f.provision("edge-k", "ephemeral");
    server.signal("-KILL");
    stopped.push(std::mem::replace(&mut server, f.start()));
    assert_eq!(f.events(&k_inst, "vm.adopted").len(), 1);
    let t = cli_json(&f.data, &["terminate-instance", &k_inst, "--force"]);
    assert_eq!(t["status"], "terminated", "{t}");
    wait_until("the adopted VM killed by terminate", 5, || !alive(k_pid));

    // A VM that died while no server was running is lost.
    let (l_inst, l_pid) = f.provision("edge-l", "ephemeral");
    server.signal("-KILL");
    kill9(l_pid);
    wait_until("the VM dead", 5, || !alive(l_pid));
    stopped.push(std::mem::replace(&mut server, f.start()));
    let i = f.instance(&l_inst);
    assert_eq!(i["status"], "failed", "{i}");
    let msg = i["failure"]["message"].as_str().unwrap();
    assert!(
        msg.contains("restarted") && msg.contains("is gone"),
        "{msg}"
    );
    assert_eq!(f.events(&l_inst, "vm.lost").len(), 1);

    // The test guard's promise: a dropped server takes its VMs along, also one a
    // SIGKILL of the server left running.
    let (_, d_pid) = f.provision("edge-d", "ephemeral");
    drop(server);
    assert!(!alive(d_pid), "a VM outlived its dropped server");
    let mut server = f.start();
    let (_, o_pid) = f.provision("edge-o", "ephemeral");
    server.signal("-KILL");
    assert!(alive(o_pid));
    drop(server);
    assert!(
        !alive(o_pid),
        "a VM outlived its SIGKILLed and dropped server"
    );
    drop(stopped);
}

/// QEMU resets the guest in place (no `-no-reboot`) and says so on its QMP event
/// socket: the server records `vm.rebooted`, the instance stays `running` on the
/// same VM, and its node, come back without credentials (ephemeral), enrolls once
/// more with its token. Resets QEMU stamps within 2 s of each other are one reboot.
/// More than 5 reboots within 10 minutes is a reboot loop: the VM is destroyed and
/// the instance fails with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_reset_in_place_is_a_reboot_and_a_reboot_loop_is_stopped() {
    let f = StandIn::new();
    let server = f.start();
    let (inst, pid) = f.provision("edge-reset", "ephemeral");
    let cmd = std::fs::read_to_string(
        f.images
            .join("instances")
            .join(&inst)
            .join("qemu-command.sh"),
    )
    .unwrap();
    assert!(!cmd.contains("-no-reboot"), "{cmd}");
    let doc =
        IdentityDocument::from_value(cli_json(&f.data, &["instance-identity", &inst])).unwrap();
    let url = format!("https://{}", server.addr);
    let mut node = FakeNode::new(doc.clone(), &url);
    node.enroll().await;
    let (s, _) = node.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(f.instance(&inst)["status"], "running");

    let qemu = qmp_events(&f.events_socket(&inst));
    // One reboot is several RESETs close together (the kernel's, then the
    // firmware's): one `vm.rebooted`.
    for ms in [0, 300, 450] {
        qemu.send(guest_reset(ms)).unwrap();
    }
    wait_until("vm.rebooted", 20, || {
        !f.events(&inst, "vm.rebooted").is_empty()
    });
    let ev = &f.events(&inst, "vm.rebooted")[0]["detail"];
    assert_eq!(ev["pid"], pid, "{ev}");
    assert_eq!(ev["reason"], "guest-reset", "{ev}");
    assert_eq!(ev["by_guest"], true, "{ev}");
    assert_eq!(ev["reboot_task"], false, "{ev}");
    assert_eq!(ev["reboots_in_window"], 1, "{ev}");
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(f.events(&inst, "vm.rebooted").len(), 1);
    let i = f.instance(&inst);
    assert_eq!(i["status"], "running", "{i}");
    assert!(alive(pid));
    assert!(f.events(&inst, "vm.exited").is_empty());

    // The node comes back with nothing but its identity document: its token enrolls
    // once more (the reset opened the window), on the same instance.
    let mut again = FakeNode::new(doc, &url);
    again.enroll().await;
    let (s, _) = again.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(f.instance(&inst)["status"], "running");
    assert_eq!(f.events(&inst, "instance.re_enrolled").len(), 1);

    // A reboot loop: the sixth reboot within the window stops the VM.
    for n in 1..=5 {
        qemu.send(guest_reset(n * 10_000)).unwrap();
    }
    wait_until("the reboot loop failed the instance", 20, || {
        f.instance(&inst)["status"] == "failed"
    });
    let i = f.instance(&inst);
    assert_eq!(i["failure"]["code"], "provider_failed", "{i}");
    let msg = i["failure"]["message"].as_str().unwrap();
    assert!(
        msg.contains("reboot loop") && msg.contains("6 reboots"),
        "{msg}"
    );
    wait_until("the looping VM killed", 10, || !alive(pid));
    assert_eq!(f.events(&inst, "vm.rebooted").len(), 6);
    assert!(f.events(&inst, "vm.exited").is_empty());
}
