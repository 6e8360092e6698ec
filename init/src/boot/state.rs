//! [`Boot`]: what the phases share (the syscall seam, the command line, the
//! timeline, what earlier phases found) and the two things every phase may do with
//! it: mark a timeline phase and write a structured console event.

use powernode_proto::node::{Phase, TimelineEntry};
use serde_json::{json, Value};

use crate::agent::AgentDriver;
use crate::cmdline::Options;
use crate::console::EVENT_PREFIX;
use crate::identity::Found;
use crate::modules::LoadReport;
use crate::net::Configured;
use crate::sys::Sys;

/// Boot state shared by the phases.
pub struct Boot<'a> {
    pub sys: &'a mut dyn Sys,
    pub options: Options,
    pub cmdline: String,
    pub timeline: Vec<TimelineEntry>,
    pub modules: LoadReport,
    pub identity: Option<Found>,
    pub network: Option<Configured>,
    /// The agent library; `None` keeps `bootstrap` identity-only (unit tests of
    /// the other phases).
    pub agent: Option<&'a mut dyn AgentDriver>,
    /// Where the agent keeps its key, certificate and identity.
    pub state_dir: Option<String>,
    /// Set once enrollment and the first handshake succeeded.
    pub enrolled: bool,
}

impl std::fmt::Debug for Boot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Boot")
            .field("options", &self.options)
            .field("timeline", &self.timeline)
            .finish_non_exhaustive()
    }
}

impl<'a> Boot<'a> {
    pub fn new(sys: &'a mut dyn Sys) -> Self {
        Self {
            sys,
            options: Options::default(),
            cmdline: String::new(),
            timeline: Vec::new(),
            modules: LoadReport::default(),
            identity: None,
            network: None,
            agent: None,
            state_dir: None,
            enrolled: false,
        }
    }

    /// The same boot with the agent library wired into `bootstrap` and the hand-off.
    pub fn with_agent(mut self, agent: &'a mut dyn AgentDriver) -> Self {
        self.agent = Some(agent);
        self
    }

    /// Records `phase` now (first time only) and returns its timestamp.
    pub fn mark(&mut self, phase: Phase) -> u64 {
        if let Some(e) = self.timeline.iter().find(|e| e.phase == phase) {
            return e.at_ms;
        }
        let at_ms = self.sys.boot_ms();
        self.timeline.push(TimelineEntry { phase, at_ms });
        at_ms
    }

    /// Writes one structured line to the console.
    pub fn event(&mut self, mut fields: Value) {
        if let Some(obj) = fields.as_object_mut() {
            obj.insert("at_ms".into(), json!(self.sys.boot_ms()));
        }
        self.sys.console(&format!("{EVENT_PREFIX}{fields}"));
    }
}
