//! The publisher client behind `powernode-stub publish-module`: build or read an OCI
//! image, compute its composefs digest with `powernode-modfmt`, push it, sign it
//! (the server's online key, or offline here with `--key`: the private key never
//! leaves this process), push the signature and record the publication.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use powernode_proto::node::{
    COMPOSEFS_DIGEST_ANNOTATION, MODULE_NAME_ANNOTATION, MODULE_VERSION_ANNOTATION,
};
use powernode_proto::paths;
use serde_json::{json, Value};
use sha2::Digest as _;

use super::client::AdminClient;
use crate::config::url_host;
use crate::registry::{parse_digest, valid_tag, OCI_MANIFEST};
use crate::service::modules::valid_module_name;
use crate::signing::{signature_tag, PublicKey, Signature, SigningKey};

/// A module image ready to push: blobs (config and layers) and the manifest bytes.
#[derive(Debug)]
pub struct ModuleImage {
    /// `(digest, source)`: layers and config.
    pub blobs: Vec<(String, BlobSource)>,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub composefs_digest: String,
}

/// Where a blob's bytes are.
#[derive(Debug)]
pub enum BlobSource {
    Memory(Vec<u8>),
    File(PathBuf),
}

fn sha256_digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn annotations(name: &str, version: &str, composefs: &str) -> Value {
    json!({
        COMPOSEFS_DIGEST_ANNOTATION: composefs,
        MODULE_NAME_ANNOTATION: name,
        MODULE_VERSION_ANNOTATION: version,
    })
}

/// How a folder becomes a module (an OCI image layout says all this itself).
#[derive(Debug, Clone, Default)]
pub struct FolderOptions {
    /// Keep the files' owners (a distribution root: daemons' own users, setuid
    /// helpers' groups); otherwise every file is 0:0.
    pub preserve_owners: bool,
    /// Image config labels (`org.powernode.services`, `org.powernode.drain`,
    /// `org.powernode.mountpoint`), covered by the signature like the files.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Builds a module image from a folder: one reproducible layer (modfmt).
pub fn image_from_folder(dir: &Path, name: &str, version: &str) -> anyhow::Result<ModuleImage> {
    image_from_folder_with(dir, name, version, &FolderOptions::default())
}

/// [`image_from_folder`] with owners kept or labels set.
pub fn image_from_folder_with(
    dir: &Path,
    name: &str,
    version: &str,
    opts: &FolderOptions,
) -> anyhow::Result<ModuleImage> {
    use powernode_modfmt::publish::{build_module, BuildOptions};
    let scratch_dir = tempfile::tempdir().context("scratch directory")?;
    let scratch = powernode_modfmt::store::ObjectStore::open(scratch_dir.path())
        .context("scratch object store")?;
    let build = BuildOptions {
        preserve_owners: opts.preserve_owners,
        ..BuildOptions::default()
    };
    let m = build_module(dir, &build, &scratch)
        .with_context(|| format!("building a module from {}", dir.display()))?;
    let composefs = m.image_digest.to_string();
    let container_config = if opts.labels.is_empty() {
        json!({})
    } else {
        json!({"Labels": opts.labels})
    };
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [m.diff_id]},
        "config": container_config,
    }))?;
    let config_digest = sha256_digest(&config);
    let mut layer_descriptor = json!({
        "mediaType": m.layer_media_type,
        "digest": m.layer_digest,
        "size": m.layer.len(),
    });
    if let Some(toc) = &m.toc {
        // The layer's table of contents (signed with the manifest): nodes fetch only
        // the files they lack.
        layer_descriptor["annotations"] = json!(toc.annotations());
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [layer_descriptor],
        "annotations": annotations(name, version, &composefs),
    }))?;
    Ok(ModuleImage {
        manifest_digest: sha256_digest(&manifest),
        manifest,
        composefs_digest: composefs,
        blobs: vec![
            (m.layer_digest, BlobSource::Memory(m.layer)),
            (config_digest, BlobSource::Memory(config)),
        ],
    })
}

fn layout_blob(layout: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let hex = parse_digest(digest).with_context(|| format!("{digest:?} is not sha256:HEX"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

fn read_layout_json(layout: &Path, digest: &str) -> anyhow::Result<(Value, Vec<u8>)> {
    let p = layout_blob(layout, digest)?;
    let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    if sha256_digest(&bytes) != digest {
        bail!("{} does not hash to its name", p.display());
    }
    Ok((serde_json::from_slice(&bytes)?, bytes))
}

/// Takes the first image of an OCI image layout (an index entry may itself be an
/// index: its first manifest is used), adds the module annotations to its manifest
/// and computes the composefs digest by unpacking its layers as the node will.
pub fn image_from_layout(layout: &Path, name: &str, version: &str) -> anyhow::Result<ModuleImage> {
    let index_path = layout.join("index.json");
    let index: Value = serde_json::from_slice(
        &std::fs::read(&index_path).with_context(|| format!("reading {}", index_path.display()))?,
    )
    .context("index.json is not JSON")?;
    let mut desc = index["manifests"][0].clone();
    let mut manifest = loop {
        let d = desc["digest"]
            .as_str()
            .context("index entry without digest")?;
        let (doc, _) = read_layout_json(layout, d)?;
        if doc.get("manifests").is_some() {
            desc = doc["manifests"][0].clone();
            continue;
        }
        break doc;
    };
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("manifest without config")?
        .to_string();
    let layers: Vec<(String, String)> = manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(|l| {
            Ok((
                l["mediaType"]
                    .as_str()
                    .context("layer without mediaType")?
                    .to_string(),
                l["digest"]
                    .as_str()
                    .context("layer without digest")?
                    .to_string(),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let scratch_dir = tempfile::tempdir().context("scratch directory")?;
    let scratch = powernode_modfmt::store::ObjectStore::open(scratch_dir.path())
        .context("scratch object store")?;
    let mut readers = Vec::new();
    for (mt, d) in &layers {
        let p = layout_blob(layout, d)?;
        let f = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        readers.push((mt.as_str(), std::io::BufReader::new(f)));
    }
    let (_, digest) = powernode_modfmt::publish::image_from_layers(&scratch, readers)
        .context("computing the composefs image of the layers")?;
    let composefs = digest.to_string();
    // Docker schema 2 has no annotations: the module becomes an OCI manifest.
    if manifest["mediaType"].as_str() == Some(crate::registry::DOCKER_MANIFEST) {
        manifest["mediaType"] = json!(OCI_MANIFEST);
        manifest["config"]["mediaType"] = json!("application/vnd.oci.image.config.v1+json");
    }
    if manifest["mediaType"].is_null() {
        manifest["mediaType"] = json!(OCI_MANIFEST);
    }
    let mut ann = manifest["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if let Value::Object(add) = annotations(name, version, &composefs) {
        ann.extend(add);
    }
    manifest["annotations"] = Value::Object(ann);
    let bytes = serde_json::to_vec(&manifest)?;
    let mut blobs = vec![(
        config_digest.clone(),
        BlobSource::File(layout_blob(layout, &config_digest)?),
    )];
    for (_, d) in &layers {
        blobs.push((d.clone(), BlobSource::File(layout_blob(layout, d)?)));
    }
    Ok(ModuleImage {
        manifest_digest: sha256_digest(&bytes),
        manifest: bytes,
        composefs_digest: composefs,
        blobs,
    })
}

/// A registry push client (distribution spec, two-step monolithic uploads).
#[derive(Debug, Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    /// `https://host:port` or `http://host:port`.
    base: String,
    /// Bearer token (the admin token for the embedded registry).
    token: Option<String>,
}

impl RegistryClient {
    pub fn new(http: reqwest::Client, base: &str, token: Option<String>) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        }
    }

    pub fn host(&self) -> &str {
        url_host(&self.base).unwrap_or("")
    }

    fn req(&self, m: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{location}", self.base)
        }
    }

    /// Pushes one blob unless the registry has it; answers the bytes sent.
    pub async fn push_blob(
        &self,
        repo: &str,
        digest: &str,
        src: &BlobSource,
    ) -> anyhow::Result<u64> {
        let head = self
            .req(
                reqwest::Method::HEAD,
                &format!("{}/v2/{repo}/blobs/{digest}", self.base),
            )
            .send()
            .await
            .context("registry unreachable")?;
        if head.status().is_success() {
            return Ok(0);
        }
        let start = self
            .req(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .send()
            .await?;
        if start.status() != reqwest::StatusCode::ACCEPTED {
            bail!(
                "starting an upload: {} {}",
                start.status(),
                start.text().await.unwrap_or_default()
            );
        }
        let loc = start
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .context("upload answer without Location")?;
        let mut url = self.absolute(loc);
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={digest}"));
        let data = match src {
            BlobSource::Memory(b) => b.clone(),
            BlobSource::File(p) => tokio::fs::read(p)
                .await
                .with_context(|| format!("reading {}", p.display()))?,
        };
        let len = data.len() as u64;
        let put = self
            .req(reqwest::Method::PUT, &url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(data)
            .send()
            .await?;
        if put.status() != reqwest::StatusCode::CREATED {
            bail!(
                "uploading {digest}: {} {}",
                put.status(),
                put.text().await.unwrap_or_default()
            );
        }
        Ok(len)
    }

    /// Pushes a manifest at `reference` (tag or digest); answers the registry's digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> anyhow::Result<String> {
        let resp = self
            .req(
                reqwest::Method::PUT,
                &format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header(reqwest::header::CONTENT_TYPE, media_type)
            .body(bytes.to_vec())
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::CREATED {
            bail!(
                "pushing manifest {reference}: {} {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        let digest = sha256_digest(bytes);
        if let Some(d) = resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
        {
            if d != digest {
                bail!("the registry stored manifest {reference} as {d}, we sent {digest}");
            }
        }
        Ok(digest)
    }
}

/// What `publish-module` needs.
#[derive(Debug, Clone)]
pub struct PublishArgs {
    pub source: PathBuf,
    pub name: String,
    pub version: String,
    pub kind: String,
    /// External registry base URL (`http://127.0.0.1:5000`); `None`: embedded.
    pub registry: Option<String>,
    pub folder: FolderOptions,
}

/// Builds or reads the image, pushes it, has the server sign it, pushes the
/// signature and records the publication. Answers the publication JSON and figures.
pub async fn publish_module(
    admin: &AdminClient,
    http: reqwest::Client,
    server_url: &str,
    admin_token: &str,
    args: &PublishArgs,
) -> anyhow::Result<Value> {
    publish(admin, http, server_url, admin_token, args, None).await
}

/// [`publish_module`] signed here with `key` (`publish-module --key`): the server
/// only records the signature, which its trust set must verify.
pub async fn publish_module_offline(
    admin: &AdminClient,
    http: reqwest::Client,
    server_url: &str,
    admin_token: &str,
    args: &PublishArgs,
    key: &SigningKey,
) -> anyhow::Result<Value> {
    publish(admin, http, server_url, admin_token, args, Some(key)).await
}

/// `GET` [`paths::ADMIN_MODULE_TRUST`]: (online signing on, the embedded registry's
/// host, the trust set).
async fn module_trust(admin: &AdminClient) -> anyhow::Result<(bool, String, Vec<PublicKey>)> {
    let (status, text) = admin
        .call(reqwest::Method::GET, paths::ADMIN_MODULE_TRUST, None)
        .await?;
    if !status.is_success() {
        bail!("reading the server's module trust: {status} {text}");
    }
    let v: Value = serde_json::from_str(&text).context("module trust answer is not JSON")?;
    let host = v["registry_host"]
        .as_str()
        .context("module trust answer without registry_host")?
        .to_string();
    let keys = v["trust_keys"]
        .as_array()
        .context("module trust answer without trust_keys")?
        .iter()
        .filter_map(|k| k.as_str().and_then(PublicKey::from_pem))
        .collect();
    Ok((v["online_signing"] == true, host, keys))
}

async fn publish(
    admin: &AdminClient,
    http: reqwest::Client,
    server_url: &str,
    admin_token: &str,
    args: &PublishArgs,
    offline: Option<&SigningKey>,
) -> anyhow::Result<Value> {
    if !valid_module_name(&args.name) {
        bail!(
            "module name {:?}: lowercase letters, digits and inner . _ -",
            args.name
        );
    }
    if !valid_tag(&args.version) {
        bail!("version {:?} is not a valid OCI tag", args.version);
    }
    // Before anything is built or pushed: a signature the server or its nodes would
    // refuse is not worth making.
    let (online, embedded_host, trust) = module_trust(admin).await?;
    match offline {
        None if !online => bail!(
            "the server does not sign online (online_signing_disabled): sign offline with \
             --key PATH (a cosign key whose public key the server trusts)"
        ),
        Some(key) if !trust.contains(&key.public_key()) => bail!(
            "the signing key is not in the server's trust set: nodes would refuse its \
             signatures (start serve with --module-trust-key for its public key:\n{})",
            key.public_pem()
        ),
        _ => {}
    }
    let src = args.source.clone();
    let (name, version) = (args.name.clone(), args.version.clone());
    let folder = args.folder.clone();
    let t0 = std::time::Instant::now();
    let image = tokio::task::spawn_blocking(move || {
        if src.join("oci-layout").is_file() {
            if folder.preserve_owners || !folder.labels.is_empty() {
                bail!("--preserve-owners and --label apply to a folder; an OCI image layout carries its own owners and labels");
            }
            image_from_layout(&src, &name, &version)
        } else if src.is_dir() {
            image_from_folder_with(&src, &name, &version, &folder)
        } else {
            bail!(
                "{} is neither a folder nor an OCI image layout",
                src.display()
            )
        }
    })
    .await??;
    let build_ms = t0.elapsed().as_millis();
    // The embedded registry takes the admin token; an external one gets no
    // credentials (a local docker-registry), over plain HTTP or HTTPS with our CA.
    let registry = match &args.registry {
        Some(url) => RegistryClient::new(http, url, None),
        None => RegistryClient::new(http, server_url, Some(admin_token.to_string())),
    };
    let registry_host = args.registry.as_ref().map(|_| registry.host().to_string());
    let repo = format!("modules/{}", args.name);
    let t1 = std::time::Instant::now();
    let mut pushed = 0u64;
    for (d, b) in &image.blobs {
        pushed += registry.push_blob(&repo, d, b).await?;
    }
    registry
        .push_manifest(&repo, &args.version, OCI_MANIFEST, &image.manifest)
        .await?;
    let push_ms = t1.elapsed().as_millis();

    let sig = match offline {
        // The reference the server would sign: the registry's host as nodes reach it.
        Some(key) => {
            let host = registry_host.as_deref().unwrap_or(&embedded_host);
            key.sign_manifest(
                &format!("{host}/{repo}"),
                &image.manifest_digest,
                &args.name,
                &args.version,
            )
            .context("signing with the offline key")?
        }
        None => {
            let (status, text) = admin
                .call(
                    reqwest::Method::POST,
                    paths::ADMIN_MODULE_SIGNATURES,
                    Some(json!({
                        "name": args.name, "version": args.version,
                        "registry": registry_host, "repository": repo,
                        "digest": image.manifest_digest,
                    })),
                )
                .await?;
            if !status.is_success() {
                bail!("signing: {status} {text}");
            }
            let v: Value = serde_json::from_str(&text)?;
            let b64 = base64::engine::general_purpose::STANDARD;
            Signature {
                payload: b64.decode(v["payload"].as_str().context("no payload")?)?,
                signature_b64: v["signature"].as_str().context("no signature")?.to_string(),
            }
        }
    };
    let sig_image = sig.image();
    for b in [&sig_image.config, &sig.payload] {
        registry
            .push_blob(&repo, &sha256_digest(b), &BlobSource::Memory(b.clone()))
            .await?;
    }
    let tag = signature_tag(&image.manifest_digest).context("digest")?;
    let signature_digest = registry
        .push_manifest(&repo, &tag, OCI_MANIFEST, &sig_image.manifest)
        .await?;

    let (status, text) = admin
        .call(
            reqwest::Method::POST,
            paths::ADMIN_MODULE_PUBLICATIONS,
            Some(json!({
                "name": args.name, "version": args.version, "kind": args.kind,
                "registry": registry_host, "repository": repo,
                "digest": image.manifest_digest, "composefs_digest": image.composefs_digest,
                "signature_digest": signature_digest,
            })),
        )
        .await?;
    if !status.is_success() {
        bail!("recording the publication: {status} {text}");
    }
    let mut out: Value = serde_json::from_str(&text)?;
    out["figures"] = json!({
        "build_ms": build_ms, "push_ms": push_ms, "bytes_pushed": pushed,
    });
    Ok(out)
}
