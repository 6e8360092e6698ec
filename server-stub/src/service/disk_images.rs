//! Admin: netboot image publications (the image folder, checked against its
//! manifest, recorded when it changed).
use axum::http::StatusCode;
use powernode_proto::ErrorCode;

use super::AppState;
use crate::clock::format_ts;
use crate::error::{AppError, AppResult};
use crate::images::{read_image_dir_cached, Publication};
use crate::model::new_id;

impl AppState {
    /// Publications, newest first.
    pub fn list_publications(&self) -> Vec<Publication> {
        let mut v = self
            .publications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        v.reverse();
        v
    }

    /// Reads an image folder's manifest (default: `--image-base`), checks its files
    /// and records a publication unless the newest one for its platform and arch
    /// already says the same.
    pub async fn publish_image(&self, dir: Option<std::path::PathBuf>) -> AppResult<Publication> {
        let dir = dir.or_else(|| self.cfg.image_base.clone()).ok_or_else(|| {
            AppError::bad_request(
                "no image folder: pass image_base or start the server with --image-base",
            )
        })?;
        let digests = self.image_digests.clone();
        let facts = tokio::task::spawn_blocking(move || read_image_dir_cached(&dir, &digests))
            .await
            .map_err(|e| AppError::internal(&e))?;
        let facts = match facts {
            Ok(f) => f,
            Err(e) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(c) = src {
                    msg.push_str(&format!(": {c}"));
                    src = c.source();
                }
                *self
                    .last_image_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
                return Err(AppError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    ErrorCode::MissingNetbootImageError,
                    msg,
                ));
            }
        };
        let _p = self.publish_lock.lock().await;
        *self
            .last_image_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        let newest = self
            .list_publications()
            .into_iter()
            .find(|p| p.platform == facts.platform && p.arch == facts.arch);
        if let Some(p) = newest.filter(|p| p.same_as(&facts)) {
            return Ok(p);
        }
        let now = self.clock.now_ms();
        let publication = Publication {
            id: new_id("pub"),
            platform: facts.platform,
            arch: facts.arch,
            kernel_version: facts.kernel_version,
            kernel_release: facts.kernel_release,
            vmlinuz_sha256: facts.vmlinuz_sha256,
            initramfs_sha256: facts.initramfs_sha256,
            path: facts.path,
            cmdline: facts.cmdline,
            disk_image: facts.disk_image,
            created_at: format_ts(now),
            created_ms: now,
        };
        self.store.insert_publication(publication.clone()).await?;
        self.publications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(publication.clone());
        let detail = serde_json::to_value(&publication).unwrap_or_default();
        self.mutate(|mem, now| {
            mem.event(now, "image.published", None, None, detail);
            Ok(())
        })
        .await?;
        tracing::info!(id = %publication.id, path = %publication.path.display(), "netboot image published");
        Ok(publication)
    }
}
