//! Admin: nodes (create, read, update, delete).
use axum::http::StatusCode;
use powernode_proto::admin::{self, CreateNodeRequest, DeleteNodeResponse, UpdateNodeRequest};
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
            return Err(AppError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::UnknownTemplate,
                format!(
                    "unknown template {:?} (see list-templates)",
                    req.template_id
                ),
            ));
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

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}
