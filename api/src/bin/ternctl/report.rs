//! `ternctl migration-report`: a migration's history as a table, a verdict on its convergence and,
//! with `--svg`, the convergence chart: per pass, what was sent against what each dirty source
//! (KVM, VMM writes, device DMA) reported, and the downtime the engine expected against its limit,
//! with the auto-converge throttle. A migration that does not converge shows it at a glance: the
//! dirty lines stay at the sent line and the expected downtime never drops under the limit.

use std::path::Path;

use plotters::prelude::*;
use tern_api::types::{MigrationIteration, MigrationPass, SwitchoverTimes, TimedStep};
use tern_api::{MigrationState, MigrationStatus};

/// Why no report could be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("no migration history: the VMM has not run a migration pass yet")]
    NoHistory,
    #[error("cannot read the saved status {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a vm.migration answer (ternctl migration-status output)")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot draw the chart to {path}: {reason}")]
    Draw { path: String, reason: String },
}

/// A status saved earlier with `ternctl migration-status > FILE`.
pub fn load(path: &Path) -> Result<MigrationStatus, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ReportError::Parse {
        path: path.display().to_string(),
        source,
    })
}

/// The whole report: verdict, then one row per pass.
pub fn text(s: &MigrationStatus) -> Result<String, ReportError> {
    if s.iterations.is_empty() {
        return Err(ReportError::NoHistory);
    }
    let mut out = verdict(s);
    if let Some(t) = &s.switchover {
        out.push_str(&format!("  switchover: {}\n", switchover_line(t)));
    }
    if !s.switchover_steps.is_empty() {
        out.push_str(&format!(
            "  switchover steps: {}\n",
            steps_line(&s.switchover_steps)
        ));
    }
    out.push('\n');
    out.push_str(&history_table(&s.iterations, None));
    Ok(out)
}

/// Why the migration did or did not converge, in one or two lines.
pub fn verdict(s: &MigrationStatus) -> String {
    let dirty_passes = s
        .iterations
        .iter()
        .filter(|r| r.pass == MigrationPass::Dirty)
        .count();
    // The final pass carries the estimate that decided the switchover; without one (cancelled,
    // failed), the last pre-copy pass's.
    let last_expected = s
        .iterations
        .iter()
        .rev()
        .find(|r| r.pass != MigrationPass::Full)
        .map(|r| r.expected_downtime_ms);
    let limit = s
        .downtime_limit_ms
        .map_or("unknown (destination side)".to_owned(), |l| {
            format!("{l} ms")
        });
    let mut out = format!(
        "migration {}: {} passes ({} pre-copy), {:.1} MiB sent, downtime limit {limit}",
        state_word(s.status),
        s.iterations.len(),
        dirty_passes,
        s.transferred_bytes as f64 / f64::from(1u32 << 20),
    );
    if let Some(d) = s.downtime_ms {
        out.push_str(&format!(", downtime {d} ms"));
    }
    out.push('\n');
    let max_throttle = s
        .iterations
        .iter()
        .map(|r| r.cpu_throttle_percent)
        .max()
        .unwrap_or(0);
    let why = match (s.status, last_expected, s.downtime_limit_ms) {
        (MigrationState::Completed, Some(e), Some(l)) if e <= l => {
            format!(
                "converged: the switchover was decided on an estimate of {e} ms, within the limit"
            )
        }
        (MigrationState::Completed, Some(e), Some(_)) => {
            format!("switched over without converging (timeout strategy ignore): expected {e} ms")
        }
        (MigrationState::Completed, None, _) => {
            "completed without a pre-copy estimate (memory handed over, or the destination's view)"
                .to_owned()
        }
        (MigrationState::Failed | MigrationState::Cancelled, Some(e), Some(l)) if e > l => {
            format!("did not converge: the guest dirtied faster than the link sent (last expected {e} ms > {l} ms)")
        }
        _ => match &s.error {
            Some(e) => format!("ended: {e}"),
            None => "in progress".to_owned(),
        },
    };
    out.push_str(&format!("  {why}"));
    if max_throttle > 0 {
        out.push_str(&format!(
            "; auto-converge throttled the vCPUs up to {max_throttle}%"
        ));
    }
    out.push('\n');
    out
}

/// The switchover's steps in one line, in the order they happen (µs).
pub fn switchover_line(t: &SwitchoverTimes) -> String {
    format!(
        "pause {} · final sync {} · claims {} ({} chunks) · final pass {} · state save {} · \
         send {} · destination restore {} · start {} (µs)",
        t.pause_us,
        t.final_sync_us,
        t.final_claim_us,
        t.final_claimed_chunks,
        t.final_pass_us,
        t.state_save_us,
        t.send_us,
        t.destination_restore_us,
        t.destination_start_us
    )
}

/// A switchover's steps (`GET vm.migration`'s `switchover_steps`) in one line, in order (µs).
pub fn steps_line(steps: &[TimedStep]) -> String {
    let parts: Vec<String> = steps
        .iter()
        .map(|s| format!("{} {}", s.name, s.us))
        .collect();
    format!("{} (µs)", parts.join(" · "))
}

fn state_word(s: MigrationState) -> &'static str {
    match s {
        MigrationState::None => "not started",
        MigrationState::Setup => "setting up",
        MigrationState::Active => "active",
        MigrationState::Completing => "completing",
        MigrationState::Completed => "completed",
        MigrationState::Failed => "failed",
        MigrationState::Cancelled => "cancelled",
        MigrationState::InDoubt => "in doubt",
    }
}

/// Rows kept when a table is limited: its first [`HEAD_ROWS`] and last passes.
const HEAD_ROWS: usize = 4;

/// One line per pass over guest memory: what it sent, how long it took and at what rate, what each
/// source reported dirty during it, the downtime the engine expected before it and the throttle.
/// With `max_rows`, a longer history shows its first and last passes.
pub fn history_table(iterations: &[MigrationIteration], max_rows: Option<usize>) -> String {
    if iterations.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "  {:>4} {:<5} {:>9} {:>9} {:>7} {:>8}   {:>9} {:>7} {:>7}   {:>12} {:>8}\n",
        "iter",
        "pass",
        "pages",
        "MiB",
        "ms",
        "MiB/s",
        "dirty:kvm",
        "vmm",
        "dma",
        "exp.downtime",
        "throttle"
    );
    let row = |r: &MigrationIteration| {
        let d = &r.dirty_pages_by_source;
        let expected = match r.pass {
            MigrationPass::Dirty | MigrationPass::Final => format!("{} ms", r.expected_downtime_ms),
            MigrationPass::Full => "-".to_owned(),
        };
        let mib = r.bytes_sent as f64 / f64::from(1u32 << 20);
        let rate = if r.duration_ms == 0 {
            "-".to_owned()
        } else {
            format!("{:.0}", mib * 1000.0 / r.duration_ms as f64)
        };
        format!(
            "  {:>4} {:<5} {:>9} {:>9.1} {:>7} {:>8}   {:>9} {:>7} {:>7}   {:>12} {:>7}%\n",
            r.iteration,
            pass_name(r.pass),
            r.pages_sent,
            mib,
            r.duration_ms,
            rate,
            d.kvm,
            d.vmm,
            d.dma,
            expected,
            r.cpu_throttle_percent
        )
    };
    match max_rows {
        Some(max) if iterations.len() > max && max > HEAD_ROWS => {
            let tail = max - HEAD_ROWS;
            iterations[..HEAD_ROWS]
                .iter()
                .for_each(|r| out.push_str(&row(r)));
            out.push_str(&format!(
                "  {:>4} ({} more passes)\n",
                "…",
                iterations.len() - max
            ));
            iterations[iterations.len() - tail..]
                .iter()
                .for_each(|r| out.push_str(&row(r)));
        }
        _ => iterations.iter().for_each(|r| out.push_str(&row(r))),
    }
    out
}

pub fn pass_name(pass: MigrationPass) -> &'static str {
    match pass {
        MigrationPass::Full => "full",
        MigrationPass::Dirty => "dirty",
        MigrationPass::Final => "final",
    }
}

/// Draws the convergence chart of `s` as an SVG file at `path`.
pub fn svg(s: &MigrationStatus, path: &Path) -> Result<(), ReportError> {
    if s.iterations.is_empty() {
        return Err(ReportError::NoHistory);
    }
    let draw_err = |e: &dyn std::fmt::Display| ReportError::Draw {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let root = SVGBackend::new(path, (960, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let (top, bottom) = root.split_vertically(400);
    pages_chart(&top, s).map_err(|e| draw_err(&e))?;
    downtime_chart(&bottom, s).map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;
/// One figure of a pass, as a chart plots it.
type PassValue = fn(&MigrationIteration) -> f64;

/// The x axis: pass index (0 = the full pass; the final pass last).
fn x_range(s: &MigrationStatus) -> std::ops::Range<u32> {
    0..u32::try_from(s.iterations.len()).unwrap_or(u32::MAX)
}

fn indexed<F: Fn(&MigrationIteration) -> f64>(s: &MigrationStatus, f: F) -> Vec<(u32, f64)> {
    (0u32..)
        .zip(s.iterations.iter())
        .map(|(i, r)| (i, f(r)))
        .collect()
}

/// Top: pages sent per pass against pages each source reported dirty (log scale: the full pass
/// and the final pass differ by orders of magnitude).
fn pages_chart(area: &Area<'_>, s: &MigrationStatus) -> DrawResult {
    let max = s
        .iterations
        .iter()
        .flat_map(|r| {
            let d = &r.dirty_pages_by_source;
            [r.pages_sent, d.kvm, d.vmm, d.dma]
        })
        .max()
        .unwrap_or(1)
        .max(10) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("tern migration: pages per pass ({})", state_word(s.status)),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range(s), (0.5f64..max * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("pass (0 = full)")
        .y_desc("pages")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let dirty: [(&str, RGBColor, PassValue); 3] = [
        ("dirty: kvm", BLUE, |r| r.dirty_pages_by_source.kvm as f64),
        ("dirty: vmm", GREEN, |r| r.dirty_pages_by_source.vmm as f64),
        ("dirty: dma", RED, |r| r.dirty_pages_by_source.dma as f64),
    ];
    for (name, color, f) in dirty {
        // Zero does not exist on a log axis: a source that reported nothing sits on the floor.
        let points = indexed(s, |r| f(r).max(0.5));
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    // Sent last, thin, with rings: when the union is one source, it lies on that source's line.
    let sent = indexed(s, |r| (r.pages_sent as f64).max(0.5));
    chart
        .draw_series(LineSeries::new(sent.clone(), BLACK.stroke_width(1)))?
        .label("sent")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
    chart.draw_series(
        sent.into_iter()
            .map(|p| Circle::new(p, 5, BLACK.stroke_width(1))),
    )?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Bottom: the downtime expected before each pass (the final pass: the estimate that decided the
/// switchover) against the limit and the measured downtime, and the throttle.
fn downtime_chart(area: &Area<'_>, s: &MigrationStatus) -> DrawResult {
    let limit = s.downtime_limit_ms.map(|l| l as f64);
    let max = s
        .iterations
        .iter()
        .map(|r| r.expected_downtime_ms as f64)
        .chain(limit)
        .chain(s.downtime_ms.map(|d| d as f64))
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "expected downtime before each pass vs the limit; auto-converge throttle",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .right_y_label_area_size(50)
        .build_cartesian_2d(x_range(s), 0f64..max * 1.15)?
        .set_secondary_coord(x_range(s), 0f64..100f64);
    chart
        .configure_mesh()
        .x_desc("pass (0 = full)")
        .y_desc("ms")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("throttle %")
        .draw()?;
    let expected: Vec<(u32, f64)> = (0u32..)
        .zip(s.iterations.iter())
        .filter(|(_, r)| r.pass != MigrationPass::Full)
        .map(|(i, r)| (i, r.expected_downtime_ms as f64))
        .collect();
    chart
        .draw_series(LineSeries::new(expected.clone(), BLUE.stroke_width(2)))?
        .label("expected downtime")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE));
    chart.draw_series(
        expected
            .into_iter()
            .map(|p| Circle::new(p, 3, BLUE.filled())),
    )?;
    let end = x_range(s).end;
    if let Some(l) = limit {
        chart
            .draw_series(LineSeries::new(vec![(0, l), (end, l)], RED.stroke_width(2)))?
            .label("downtime limit")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
    }
    if let Some(d) = s.downtime_ms {
        let last = end.saturating_sub(1);
        chart
            .draw_series(std::iter::once(Cross::new(
                (last, d as f64),
                6,
                BLACK.stroke_width(2),
            )))?
            .label(format!("measured downtime {d} ms"))
            .legend(|(x, y)| Cross::new((x + 9, y), 5, BLACK));
    }
    chart
        .draw_secondary_series(LineSeries::new(
            indexed(s, |r| f64::from(r.cpu_throttle_percent)),
            MAGENTA.stroke_width(1),
        ))?
        .label("throttle %")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], MAGENTA));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::types::DirtyPagesBySource;

    fn pass(i: u64, pass: MigrationPass, sent: u64, kvm: u64, expected: u64) -> MigrationIteration {
        MigrationIteration {
            iteration: i,
            pass,
            pages_sent: sent,
            bytes_sent: sent * 4096,
            duration_ms: 10,
            dirty_pages_by_source: DirtyPagesBySource {
                kvm,
                vmm: 0,
                dma: 0,
            },
            expected_downtime_ms: expected,
            ..MigrationIteration::default()
        }
    }

    fn status(state: MigrationState, expected: &[u64]) -> MigrationStatus {
        let mut iterations = vec![pass(0, MigrationPass::Full, 1000, 0, 0)];
        for (i, e) in (1u64..).zip(expected) {
            iterations.push(pass(i, MigrationPass::Dirty, 100, 100, *e));
        }
        MigrationStatus {
            status: state,
            iterations,
            downtime_limit_ms: Some(50),
            ..MigrationStatus::default()
        }
    }

    #[test]
    fn long_histories_keep_their_first_and_last_passes() {
        let passes: Vec<_> = (0..30)
            .map(|i| pass(i, MigrationPass::Dirty, 1, 1, 1))
            .collect();
        let table = history_table(&passes, Some(20));
        let first: Vec<_> = table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap_or_default())
            .collect();
        let mut want: Vec<String> = (0..4).map(|i| i.to_string()).collect();
        want.push("…".into());
        want.extend((14..30).map(|i| i.to_string()));
        assert_eq!(first, want);
        assert_eq!(history_table(&passes, None).lines().count(), 31);
        assert!(history_table(&[], None).is_empty());
    }

    #[test]
    fn the_verdict_tells_convergence_from_its_absence() {
        let mut done = status(MigrationState::Completed, &[400, 120, 60]);
        done.iterations
            .push(pass(4, MigrationPass::Final, 10, 10, 30));
        let ok = verdict(&done);
        assert!(ok.contains("decided on an estimate of 30 ms"), "{ok}");
        let forced = verdict(&status(MigrationState::Completed, &[400, 120, 60]));
        assert!(forced.contains("without converging"), "{forced}");
        let stuck = verdict(&status(MigrationState::Failed, &[400, 390, 410]));
        assert!(stuck.contains("did not converge"), "{stuck}");
        assert!(stuck.contains("410 ms > 50 ms"), "{stuck}");
    }

    #[test]
    fn the_chart_has_every_series() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("chart.svg");
        let s = status(MigrationState::Completed, &[400, 120, 30]);
        svg(&s, &path).unwrap_or_else(|e| panic!("{e}"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for label in [
            "sent",
            "dirty: kvm",
            "dirty: dma",
            "expected downtime",
            "downtime limit",
            "throttle %",
        ] {
            assert!(text.contains(label), "no {label:?} in the chart");
        }
        // One point per pass for each of the four page series, one per pre-copy pass for the
        // expected downtime.
        assert_eq!(text.matches("<circle").count(), 4 * 4 + 3);
        let empty = MigrationStatus::default();
        assert!(matches!(svg(&empty, &path), Err(ReportError::NoHistory)));
    }
}
