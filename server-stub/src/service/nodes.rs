//! Admin: nodes (create, read, update, delete), and clusters of them made and
//! provisioned in one call.
use axum::http::StatusCode;
use powernode_proto::admin::{
    self, ClusterError, ClusterMember, CreateNodeRequest, DeleteNodeResponse,
    ProvisionClusterRequest, ProvisionClusterResponse, ProvisionRequest, UpdateNodeRequest,
    MAX_CLUSTER_COUNT,
};
use powernode_proto::ErrorCode;
use serde_json::json;

use super::AppState;
use crate::error::{AppError, AppResult};
use crate::model::{new_id, NodeRec, Op};

impl AppState {
    pub async fn create_node(&self, req: CreateNodeRequest) -> AppResult<admin::Node> {
        if !valid_name(&req.hostname) {
            return Err(AppError::bad_request(
                "hostname must be 1-253 ASCII letters, digits, '-', '_' or '.'",
            ));
        }
        if self.template(&req.template_id).is_none() {
            return Err(unknown_template(&req.template_id));
        }
        self.mutate(|mem, now| {
            let node = NodeRec {
                id: new_id("node"),
                hostname: req.hostname,
                template_id: req.template_id,
                lifecycle_class: req.lifecycle_class,
                lifecycle_class_locked: false,
                labels: req.labels,
                current_instance_id: None,
                instance_history: Vec::new(),
                created_ms: now,
            };
            let id = node.id.clone();
            mem.nodes.insert(id.clone(), node);
            mem.save_node(&id);
            mem.event(now, "node.created", Some(&id), None, json!({}));
            Ok(mem.node_view(&mem.nodes[&id]))
        })
        .await
    }

    /// `count` Nodes of one template, each created and provisioned in turn. Everything
    /// the request names is checked before the first Node is made; a failure after
    /// that stops the call, keeps what was made and names the hostname it failed on.
    pub async fn provision_cluster(
        &self,
        req: ProvisionClusterRequest,
    ) -> AppResult<ProvisionClusterResponse> {
        if req.count == 0 || req.count > MAX_CLUSTER_COUNT {
            return Err(AppError::bad_request(format!(
                "count must be 1 to {MAX_CLUSTER_COUNT} (the most one call provisions), not {}",
                req.count
            )));
        }
        let prefix = match req.hostname_prefix.clone() {
            Some(p) => p,
            None => format!("node-{:06x}", rand::random::<u32>() & 0xff_ffff),
        };
        let last = format!("{prefix}-{}", req.count);
        if !valid_name(&last) {
            return Err(AppError::bad_request(
                "hostname_prefix: ASCII letters, digits, '-', '_' or '.', at most 249 of them",
            ));
        }
        if self.template(&req.template_id).is_none() {
            return Err(unknown_template(&req.template_id));
        }
        let mut members = Vec::new();
        for i in 1..=req.count {
            let hostname = format!("{prefix}-{i}");
            match self.cluster_member(&req, &hostname).await {
                Ok(m) => members.push(m),
                Err(e) => {
                    tracing::warn!(%hostname, made = members.len(), error = %e.message,
                        "provision-cluster stopped");
                    return Ok(ProvisionClusterResponse {
                        members,
                        error: Some(ClusterError {
                            hostname,
                            code: e.code,
                            message: e.message,
                        }),
                    });
                }
            }
        }
        Ok(ProvisionClusterResponse {
            members,
            error: None,
        })
    }

    async fn cluster_member(
        &self,
        req: &ProvisionClusterRequest,
        hostname: &str,
    ) -> AppResult<ClusterMember> {
        let node = self
            .create_node(CreateNodeRequest {
                hostname: hostname.to_string(),
                template_id: req.template_id.clone(),
                lifecycle_class: req.lifecycle_class,
                labels: req.labels.clone(),
            })
            .await?;
        let prov = self
            .provision(
                &node.id,
                ProvisionRequest {
                    instance_type: req.instance_type.clone(),
                    region: req.region.clone(),
                },
            )
            .await?;
        Ok(ClusterMember {
            node_id: node.id,
            hostname: hostname.to_string(),
            instance_id: prov.instance.id,
            task_id: prov.task_id,
        })
    }

    pub fn get_node(&self, id: &str) -> AppResult<admin::Node> {
        let mem = self.lock();
        let node = mem
            .nodes
            .get(id)
            .ok_or_else(|| AppError::not_found("node", id))?;
        Ok(mem.node_view(node))
    }

    pub fn list_nodes(&self) -> Vec<admin::Node> {
        let mem = self.lock();
        let mut nodes: Vec<_> = mem.nodes.values().map(|n| mem.node_view(n)).collect();
        nodes.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        nodes
    }

    pub async fn update_node(&self, id: &str, req: UpdateNodeRequest) -> AppResult<admin::Node> {
        self.mutate(|mem, now| {
            let node = mem
                .nodes
                .get(id)
                .ok_or_else(|| AppError::not_found("node", id))?;
            if let Some(class) = req.lifecycle_class {
                if node.lifecycle_class_locked && class != node.lifecycle_class {
                    return Err(AppError::conflict(
                        ErrorCode::LifecycleClassImmutable,
                        format!(
                            "lifecycle_class is {} and fixed since the first provision",
                            node.lifecycle_class.as_str()
                        ),
                    ));
                }
            }
            let node = mem
                .nodes
                .get_mut(id)
                .ok_or_else(|| AppError::not_found("node", id))?;
            if let Some(class) = req.lifecycle_class {
                node.lifecycle_class = class;
            }
            if let Some(labels) = req.labels {
                node.labels = labels;
            }
            mem.save_node(id);
            mem.event(now, "node.updated", Some(id), None, json!({}));
            Ok(mem.node_view(&mem.nodes[id]))
        })
        .await
    }

    pub async fn delete_node(&self, id: &str) -> AppResult<DeleteNodeResponse> {
        self.mutate(|mem, now| {
            let node = mem
                .nodes
                .get(id)
                .ok_or_else(|| AppError::not_found("node", id))?;
            if let Some(inst) = mem.live_instance(node) {
                return Err(AppError::conflict(
                    ErrorCode::NodeHasLiveInstance,
                    format!(
                        "node has live instance {} ({}): terminate it first",
                        inst.id, inst.status
                    ),
                ));
            }
            mem.nodes.remove(id);
            mem.ops.push(Op::DeleteNode(id.to_string()));
            mem.event(now, "node.deleted", Some(id), None, json!({}));
            Ok(DeleteNodeResponse {
                deleted: true,
                node_id: id.to_string(),
            })
        })
        .await
    }
}

fn unknown_template(id: &str) -> AppError {
    AppError::new(
        StatusCode::BAD_REQUEST,
        ErrorCode::UnknownTemplate,
        format!("unknown template {id:?} (see list-templates)"),
    )
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}
