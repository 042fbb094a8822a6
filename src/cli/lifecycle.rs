//! Signals: SIGTERM/SIGINT drain and stop the server, SIGHUP reloads the
//! `[memory]` settings live.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use super::{ServeArgs, load_config};
use crate::admin::health::Health;
use crate::config::Config;
use crate::guard::Guard;

/// Resolves once the server should stop accepting calls: on SIGTERM or SIGINT,
/// readiness turns NOT_SERVING at once, then `drain_delay` passes so endpoint
/// lists and load balancers catch up while in-flight and new calls still work.
pub async fn drain_on_signal(health: Health, drain_delay: Duration) {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    };
    health.begin_shutdown().await;
    tracing::info!(signal = which, drain_delay = ?drain_delay, "shutdown: readiness is NOT_SERVING; draining");
    tokio::time::sleep(drain_delay).await;
}

/// On SIGHUP, re-reads the configuration (file, environment, flags) and applies
/// its `[memory]` section live; a file that does not load changes nothing.
pub fn spawn_reload(args: ServeArgs, running: Config, guard: Guard) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; configuration reload disabled");
            return;
        }
    };
    tokio::spawn(async move {
        let mut running = running;
        while hup.recv().await.is_some() {
            let a = args.clone();
            let loaded = tokio::task::spawn_blocking(move || load_config(&a)).await;
            let new = match loaded {
                Ok(Ok(cfg)) => cfg,
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "configuration reload failed; the running settings stay");
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "configuration reload failed; the running settings stay");
                    continue;
                }
            };
            let changed = guard.reconfigure(new.memory.clone());
            let restart_only: Vec<&str> = [
                ("server", running.server != new.server),
                ("storage", running.storage != new.storage),
                ("log", running.log != new.log),
                ("admin", running.admin != new.admin),
                ("shutdown", running.shutdown != new.shutdown),
            ]
            .into_iter()
            .filter_map(|(k, differs)| differs.then_some(k))
            .collect();
            let budget = guard.view().budget;
            tracing::info!(
                changed = ?changed,
                budget,
                "configuration reloaded: [memory] applied (enabled, limit and purge_min_interval take effect on restart)"
            );
            if !restart_only.is_empty() {
                tracing::warn!(sections = ?restart_only, "these sections changed but take effect only on restart");
            }
            running = new;
        }
    });
}
