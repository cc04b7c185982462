//! `ternctl migration-status --watch`: poll `vm.migration` until a terminal status, showing progress
//! (an indicatif bar on a terminal, one plain line per change otherwise), then print a summary.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tern_api::{ApiClient, ApiClientError, MigrationState, MigrationStatus};

/// Why watching stopped before the migration ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "no migration has run in this VMM: start one with send-migration (or receive-migration)"
    )]
    NoMigration,
    #[error("lost the VMM while the migration was {last}: a source exits after a successful migration, so ask the destination for the result")]
    VmmGone {
        last: &'static str,
        #[source]
        source: ApiClientError,
    },
    #[error("cannot read migration status")]
    Status(#[source] ApiClientError),
}

pub fn watch(
    client: &ApiClient,
    interval: Duration,
) -> Result<ExitCode, Box<dyn std::error::Error + 'static>> {
    let mut status = client.vm_migration_status().map_err(WatchError::Status)?;
    if status.status == MigrationState::None {
        return Err(WatchError::NoMigration.into());
    }
    let mut view = View::new(std::io::stdout().is_terminal());
    loop {
        view.show(&status);
        if status.status.is_terminal() {
            break;
        }
        std::thread::sleep(interval);
        status = match client.vm_migration_status() {
            Ok(s) => s,
            // Any transport failure (refused, reset, cut-off answer) means the VMM is gone or
            // going; an HTTP error status means it is there and said no.
            Err(source) if source.status().is_none() => {
                view.finish();
                return Err(WatchError::VmmGone {
                    last: state_name(status.status),
                    source,
                }
                .into());
            }
            Err(e) => {
                view.finish();
                return Err(WatchError::Status(e).into());
            }
        };
    }
    view.finish();
    super::out::emit(&summary(&status));
    if status.status == MigrationState::Completed {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "ternctl: migration {}: {}",
            state_name(status.status),
            status.error.as_deref().unwrap_or("no reason given")
        );
        Ok(ExitCode::FAILURE)
    }
}

/// Progress output: a live bar on a terminal, plain lines (only when something changed) otherwise.
enum View {
    Bar(ProgressBar),
    Lines { last: Option<String> },
}

impl View {
    fn new(interactive: bool) -> View {
        if !interactive {
            return View::Lines { last: None };
        }
        let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stdout());
        // The template is a constant; if indicatif ever rejects it, the default style still works.
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} {prefix:>10} [{elapsed_precise}] [{wide_bar}] {percent:>3}%\n  {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        View::Bar(bar)
    }

    fn show(&mut self, s: &MigrationStatus) {
        match self {
            View::Bar(bar) => {
                bar.set_length(s.total_bytes.max(1));
                bar.set_position(converged_bytes(s));
                bar.set_prefix(state_name(s.status));
                bar.set_message(progress_text(s));
            }
            View::Lines { last } => {
                let line = format!("migration {} {}", state_name(s.status), progress_text(s));
                if last.as_deref() != Some(line.as_str()) {
                    super::out::emit(&format!("{line}\n"));
                    *last = Some(line);
                }
            }
        }
    }

    fn finish(&mut self) {
        if let View::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// Bytes of guest memory that no longer need sending: the bar fills as the dirty set shrinks.
fn converged_bytes(s: &MigrationStatus) -> u64 {
    if s.status == MigrationState::Completed {
        return s.total_bytes;
    }
    s.total_bytes.saturating_sub(s.remaining_bytes)
}

fn progress_text(s: &MigrationStatus) -> String {
    let mut text = format!(
        "iteration {} · sent {} · remaining {} · {}/s · {} dirty pages/s · expected downtime {} ms",
        s.iteration,
        HumanBytes(s.transferred_bytes),
        HumanBytes(s.remaining_bytes),
        HumanBytes(s.bandwidth_bytes_per_s),
        s.dirty_pages_per_s,
        s.expected_downtime_ms
    );
    if s.cpu_throttle_percent > 0 {
        text.push_str(&format!(" · vCPU throttle {}%", s.cpu_throttle_percent));
    }
    if !s.dma_pages_by_device.is_empty() {
        text.push_str(&format!(" · dma {}", dma_by_device(s)));
    }
    text
}

/// `[hwpt 3: edu0] 12, [hwpt 4: nic0] 0`: DMA dirty pages per tracking domain (its label names the
/// devices and may contain spaces and colons, hence the brackets).
fn dma_by_device(s: &MigrationStatus) -> String {
    s.dma_pages_by_device
        .iter()
        .map(|(label, pages)| format!("[{label}] {pages}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn state_name(state: MigrationState) -> &'static str {
    match state {
        MigrationState::None => "none",
        MigrationState::Setup => "setup",
        MigrationState::Active => "active",
        MigrationState::Completing => "completing",
        MigrationState::Completed => "completed",
        MigrationState::Failed => "failed",
        MigrationState::Cancelled => "cancelled",
        MigrationState::InDoubt => "in doubt (VM paused: resume it on one side)",
    }
}

fn ms(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"))
}

fn summary(s: &MigrationStatus) -> String {
    let d = &s.dirty_pages_by_source;
    let mut out = format!(
        "migration {}\n  downtime:     {}\n  total time:   {}\n  setup time:   {}\n  \
         transferred:  {} ({} bytes) of {} guest memory\n  iterations:   {}\n  \
         dirty pages:  kvm {}, vmm {}, dma {}\n",
        state_name(s.status),
        ms(s.downtime_ms),
        ms(s.total_time_ms),
        ms(s.setup_time_ms),
        HumanBytes(s.transferred_bytes),
        s.transferred_bytes,
        HumanBytes(s.total_bytes),
        s.iteration,
        d.kvm,
        d.vmm,
        d.dma
    );
    if !s.dma_pages_by_device.is_empty() {
        out.push_str(&format!("  dma pages:    {}\n", dma_by_device(s)));
    }
    if let Some(t) = &s.switchover {
        out.push_str(&format!(
            "  switchover:   {}\n",
            super::report::switchover_line(t)
        ));
    }
    if !s.switchover_steps.is_empty() {
        out.push_str(&format!(
            "  steps:        {}\n",
            super::report::steps_line(&s.switchover_steps)
        ));
    }
    for d in s.devices.iter().filter(|d| d.handed_over) {
        out.push_str(&format!(
            "  device {}: handed over to the new process (live update){}\n",
            d.id,
            d.handover_note
                .as_deref()
                .map(|n| format!("; {n}"))
                .unwrap_or_default()
        ));
    }
    for d in s.devices.iter().filter(|d| !d.handed_over) {
        out.push_str(&format!(
            "  device {}: pre-copy {} B, stop-copy {} B in {} us{}{}{}\n",
            d.id,
            d.precopy_bytes,
            d.stop_copy_bytes,
            d.stop_copy_us,
            if d.initial_data_acked {
                ", initial data acked"
            } else {
                ""
            },
            if d.p2p { ", p2p" } else { "" },
            if d.reset { ", reset" } else { "" },
        ));
    }
    if let Some(e) = &s.error {
        out.push_str(&format!("  error:        {e}\n"));
    }
    out.push_str(&super::report::history_table(
        &s.iterations,
        Some(HISTORY_ROWS),
    ));
    out
}

/// Passes the summary lists in full; `ternctl migration-report` shows every pass.
const HISTORY_ROWS: usize = 20;
