//! Every cloud metadata format the agent parses: each provider's documents (AWS
//! IMDSv2 texts, Azure IMDS JSON and the `ovf-env.xml` CustomData, GCE texts and
//! interface JSON, DigitalOcean, Oracle, Scaleway and Vultr JSON, Hetzner texts and
//! the `private-networks` YAML, OpenStack `meta_data.json` / `network_data.json`
//! from a config drive and from the metadata service), the user data they carry
//! (`parse_user_data`), the generic URL source, and the pure helpers
//! (`openstack::fs_label`, `hetzner::private_ips`, the zone-to-region rules,
//! `http::text_value` / `ip_value`, `UrlSource::from_cmdline`).
//!
//! How the bytes get in: the providers' parsing is interleaved with their requests
//! (which document is read next depends on the last one), so each provider runs its
//! real `CloudProvider::fetch` on a `Fetcher` in replay mode (the agent's `fuzzing`
//! feature): each request takes the next answer cut from the input, judged by the
//! same status, size and raw-HTTP rules as a real response. Measured on this
//! machine (2 cores shared, loaded, `nice 19`): a first version with a loopback
//! HTTP server on 127.0.0.1 answering with the input (no agent change) ran at about
//! 250 inputs/s, every request going through reqwest, hyper and tokio (that run
//! also read the host's CA bundle for some `url` inputs, since fixed, so the server
//! alone was somewhat faster); replay runs the same walks at about 1,000-1,300/s
//! on the same loaded machine. Pure parse functions per provider would have meant
//! splitting nine providers' `read` into fetch and parse halves; replay is one seam
//! in `http.rs`, off in every build but this one, and leaves the providers as they
//! are. What replay does not reach: reqwest's own response handling (a third-party
//! parser) and the socket code of the privileged-port client (its response
//! parsing, `raw_response`, is reached through `R` answers).
//!
//! Input: byte 0 picks the target (`% 12`), the rest is split on `0xFF` into
//! segments. For a provider each segment is one response, the first byte its
//! status (`4` 404, `5` 503, `3` 403, `R` the rest is the whole raw HTTP response,
//! anything else 200 with the rest as the body); requests past the last segment get
//! 404. Azure first takes one segment as the `ovf-env.xml`; the OpenStack drive
//! takes three (meta_data.json, user_data, network_data.json; status byte `4`
//! means the file is absent). Target 11 feeds the rest to the pure helpers.
#![no_main]
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use powernode_agent::identity::cloud::{
    aws, azure, digitalocean, gcp, hetzner,
    http::{self, Replay},
    openstack, oracle, parse_user_data, scaleway, url, vultr, CloudProvider, Fetcher, RetryPolicy,
};

struct World {
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| World {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime"),
        dir: tempfile::tempdir().expect("temp dir"),
    })
}

fn answer(segment: &[u8]) -> Replay {
    let (first, rest) = segment
        .split_first()
        .map_or((b'2', &[][..]), |(f, r)| (*f, r));
    match first {
        b'4' => Replay::Status(404, Vec::new()),
        b'5' => Replay::Status(503, Vec::new()),
        b'3' => Replay::Status(403, rest.to_vec()),
        b'R' => Replay::Raw(rest.to_vec()),
        _ => Replay::Status(200, rest.to_vec()),
    }
}

/// One fetcher per provider for the whole process (building its reqwest client per
/// input would dominate the run).
fn cached_fetcher(which: usize) -> &'static Fetcher {
    static FETCHERS: OnceLock<Vec<Fetcher>> = OnceLock::new();
    &FETCHERS.get_or_init(|| {
        let names = [
            aws::NAME,
            azure::NAME,
            gcp::NAME,
            digitalocean::NAME,
            hetzner::NAME,
            openstack::NAME,
            openstack::NAME,
            oracle::NAME,
            scaleway::NAME,
            vultr::NAME,
            url::NAME,
        ];
        let _guard = world().runtime.enter();
        names
            .iter()
            .map(|n| {
                let policy = RetryPolicy {
                    base: Duration::from_millis(1),
                    cap: Duration::from_millis(1),
                    max_attempts: 1,
                    connect_timeout: Duration::from_secs(2),
                    request_timeout: Duration::from_secs(2),
                };
                // Replay answers at once; nothing waits on this.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10 * 365 * 86400);
                Fetcher::new(n, policy, deadline, true, None, false).expect("fetcher")
            })
            .collect::<Vec<_>>()
    })[which]
}

fn write_or_remove(path: &std::path::Path, segment: Option<&[u8]>) {
    match segment {
        Some([b'4', ..]) | None => {
            let _ = std::fs::remove_file(path);
        }
        Some(s) => std::fs::write(path, s.get(1..).unwrap_or_default()).expect("write"),
    }
}

fn pure(data: &[u8]) {
    let _ = openstack::fs_label(data);
    // The ISO 9660 descriptor sits at 32 KiB; put the input there too.
    let mut head = vec![0u8; 0x8000];
    head.extend_from_slice(data);
    let _ = openstack::fs_label(&head);
    let _ = parse_user_data("fuzz", data);
    let _ = http::text_value(data);
    let text = String::from_utf8_lossy(data);
    let _ = hetzner::private_ips(&text);
    let _ = http::ip_value(&text);
    let _ = aws::region_of_zone(&text);
    let _ = gcp::region_of_zone(&text);
    let _ = scaleway::region_of_zone(&text);
    if let Ok(source) = url::UrlSource::from_cmdline(&text) {
        // Not the host's bundle: parsing 200 KB of PEM per input would be the run.
        let _ = source.with_system_bundle(None).tls();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let which = usize::from(pick) % 12;
    if which == 11 {
        pure(rest);
        return;
    }
    let world = world();
    let mut segments = rest.split(|&b| b == 0xFF);
    // Never asked: every request is replayed.
    let base = "http://127.0.0.1:9".to_string();
    let provider: Box<dyn CloudProvider> = match which {
        0 => Box::new(aws::Aws::new(base)),
        1 => {
            let ovf = world.dir.path().join("ovf-env.xml");
            write_or_remove(&ovf, segments.next());
            Box::new(azure::Azure::new(base).with_ovf_env(ovf))
        }
        2 => Box::new(gcp::Gcp::new(base)),
        3 => Box::new(digitalocean::DigitalOcean::new(base)),
        4 => Box::new(hetzner::Hetzner::new(base)),
        5 => {
            let latest = world.dir.path().join("drive/openstack/latest");
            std::fs::create_dir_all(&latest).expect("drive dir");
            for name in ["meta_data.json", "user_data", "network_data.json"] {
                write_or_remove(&latest.join(name), segments.next());
            }
            let drive = openstack::ConfigDrive::Dir(world.dir.path().join("drive"));
            Box::new(openstack::OpenStack::new(base, drive))
        }
        6 => Box::new(openstack::OpenStack::new(base, openstack::ConfigDrive::Off)),
        7 => Box::new(oracle::Oracle::new(base)),
        8 => Box::new(scaleway::Scaleway::new(base)),
        9 => Box::new(vultr::Vultr::new(base)),
        _ => Box::new(url::UrlSource::new(format!("{base}/identity"), None)),
    };
    let http = cached_fetcher(which);
    http.replay(segments.map(answer));
    let outcome = world.runtime.block_on(provider.fetch(http));
    // `POWERNODE_FUZZ_DEBUG=1 .../cloud_metadata SEED`: what a seed reaches.
    static DEBUG: OnceLock<bool> = OnceLock::new();
    if *DEBUG.get_or_init(|| std::env::var_os("POWERNODE_FUZZ_DEBUG").is_some()) {
        match &outcome {
            Ok(found) => eprintln!("{}: {found:?}", provider.name()),
            Err(e) => eprintln!("{}: error: {e} ({:?})", provider.name(), e.kind),
        }
    }
});
