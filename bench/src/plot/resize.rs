//! The resize scenario's picture: memory over time with the cgroup limit as it
//! was changed (a step), the guard's budget, its reserved bytes, the cgroup's
//! working set and the server's RSS; a bar where the lower limit was applied
//! (and a grey one where it was asked for, if the kernel refused it first), and
//! at the foot of the chart a mark per attempt that ended badly: a cross where
//! an upload was cut, a triangle where a call was refused.

use std::path::Path;

use plotters::prelude::*;

use super::{
    BUDGET, FONT, GREY, LIMIT, PURGE, RESERVED, RSS, WORKING_SET, err, increments,
    legend::{self, Swatch},
};
use crate::{calls::Outcome, mib, report::fmt_mib, resize::ResizeReport, timeline::Sample};

const WIDTH: u32 = 1600;
const HEIGHT: u32 = 860;
const HEADER: u32 = 96;
const LEGEND: u32 = 420;

/// One figure of a sample.
type Reading = fn(&Sample) -> Option<u64>;

/// Draws `report` into a PNG at `path`.
pub fn draw(path: &Path, report: &ResizeReport) -> anyhow::Result<()> {
    super::fonts();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (header, body) = root.split_vertically(HEADER);
    let o = &report.options;
    let title = format!(
        "memgate resize: cgroup limit {:.0} → {:.0} MiB under a burst",
        mib(report.limit_before),
        mib(o.resize_to)
    );
    let subtitle = format!(
        "{} × {} MB uploads + {} × Process{} at once; cgroup {}; {} cores",
        o.uploads,
        o.size as f64 / 1e6,
        o.process,
        if o.echo { " (echo)" } else { "" },
        report.cgroup_version.as_deref().unwrap_or("?"),
        report.machine.cores
    );
    let big = TextStyle::from((FONT, 30, FontStyle::Bold).into_font()).color(&BLACK);
    let grey = BLACK.mix(0.8);
    let small = TextStyle::from((FONT, 19).into_font()).color(&grey);
    header.draw_text(&title, &big, (24, 14)).map_err(err)?;
    header.draw_text(&subtitle, &small, (24, 58)).map_err(err)?;

    let samples = &report.samples;
    let t_max = samples.last().map_or(1.0, |s| s.t).max(0.5) * 1.02;
    let y_max = mib(samples
        .iter()
        .flat_map(|s| [s.rss, s.working_set, s.guard.reserved])
        .flatten()
        .chain([report.limit_before])
        .max()
        .unwrap_or(0))
        * 1.1;
    let (plot, side) = body.split_horizontally(WIDTH - LEGEND);
    let mut chart = ChartBuilder::on(&plot)
        .margin_left(16)
        .margin_right(8)
        .margin_top(12)
        .x_label_area_size(56)
        .y_label_area_size(84)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time since the server was ready (s)")
        .y_desc("memory (MiB)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 17))
        .axis_desc_style((FONT, 19))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(err)?;
    let mut entries = Vec::new();

    // The cgroup limit as the bench set it: a step at each applied change.
    let mut steps = vec![(0.0, mib(report.limit_before))];
    for r in [Some(&report.lower), report.raise.as_ref()]
        .into_iter()
        .flatten()
    {
        if let (Some(t), Some(l)) = (r.applied_at, r.applied) {
            let prev = steps.last().map_or(0.0, |p| p.1);
            steps.extend([(t, prev), (t, mib(l))]);
        }
    }
    steps.push((t_max, steps.last().map_or(0.0, |p| p.1)));
    chart
        .draw_series(LineSeries::new(steps, LIMIT.stroke_width(3)))
        .map_err(err)?;
    entries.push((Swatch::Line(LIMIT), "cgroup limit".to_string()));
    let lines: [(RGBColor, Reading, &str, u32); 4] = [
        (BUDGET, |s| s.guard.budget, "guard budget", 2),
        (RESERVED, |s| s.guard.reserved, "guard reserved", 2),
        (WORKING_SET, |s| s.working_set, "cgroup working set", 1),
        (RSS, |s| s.rss, "server RSS", 1),
    ];
    for (color, value, label, width) in lines {
        let points: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|s| value(s).map(|v| (s.t, mib(v))))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(width)))
            .map_err(err)?;
        entries.push((Swatch::Line(color), label.to_string()));
    }

    let bar = |t: f64, c: ShapeStyle| PathElement::new(vec![(t, 0.0), (t, y_max)], c);
    let lower = &report.lower;
    if lower.refused > 0 {
        chart
            .draw_series([bar(lower.requested_at, GREY.stroke_width(2))])
            .map_err(err)?;
        entries.push((
            Swatch::Bar(GREY),
            format!("lower limit asked ({} × EBUSY)", lower.refused),
        ));
    }
    if let Some(t) = lower.applied_at {
        chart
            .draw_series([bar(t, BLACK.stroke_width(2))])
            .map_err(err)?;
        entries.push((Swatch::Bar(BLACK), "lower limit applied".into()));
    }
    if let Some(t) = report.raise.as_ref().and_then(|r| r.applied_at) {
        chart
            .draw_series([bar(t, PURGE.stroke_width(2))])
            .map_err(err)?;
        entries.push((Swatch::Bar(PURGE), "limit raised back".into()));
    }
    let kills = increments(samples.iter().map(|s| (s.t, s.oom_kills)));
    chart
        .draw_series(kills.iter().map(|&t| bar(t, LIMIT.stroke_width(5))))
        .map_err(err)?;
    if !kills.is_empty() {
        entries.push((Swatch::Bar(LIMIT), "OOM kill".into()));
    }

    // Attempts that ended badly, at the foot: cut (the server had taken some of
    // the upload) or refused.
    let foot = y_max * 0.03;
    let (mut cuts, mut refusals) = (Vec::new(), Vec::new());
    for t in report.calls.iter().flat_map(|c| &c.attempts) {
        match (&t.outcome, t.cut()) {
            (Outcome::Ok, _) => {}
            (_, true) => cuts.push((t.end, foot * 2.0)),
            (_, false) => refusals.push((t.end, foot)),
        }
    }
    chart
        .draw_series(
            cuts.iter()
                .map(|&p| Cross::new(p, 7, LIMIT.stroke_width(2))),
        )
        .map_err(err)?;
    chart
        .draw_series(
            refusals
                .iter()
                .map(|&p| TriangleMarker::new(p, 6, BUDGET.filled())),
        )
        .map_err(err)?;
    entries.push((Swatch::Cross(LIMIT), format!("upload cut ({})", cuts.len())));
    entries.push((
        Swatch::Triangle(BUDGET),
        format!("attempt refused ({})", refusals.len()),
    ));

    let f = &report.figures;
    let mut facts = vec![
        "figures".to_string(),
        format!(
            "OOM kills: {}",
            report.oom_kills.map_or("n/a".into(), |k| k.to_string())
        ),
        format!(
            "calls OK {}/{}; {} resumes",
            f.ok.values().sum::<usize>(),
            report.calls.len(),
            f.resumes
        ),
        format!(
            "budget {} → {}",
            fmt_mib(f.budget_before),
            fmt_mib(f.budget_after)
        ),
        format!("reserved when seen {}", fmt_mib(f.reserved_when_seen)),
        format!(
            "over budget for {}",
            f.over_budget_for
                .map_or("ever".into(), |d| format!("{d:.1} s"))
        ),
        format!("peak usage after {}", fmt_mib(f.peak_usage_after)),
        format!("peak working set {}", fmt_mib(f.peak_working_set_after)),
    ];
    facts.extend(
        report
            .checks
            .iter()
            .map(|c| format!("{} {}", if c.passed { "PASS" } else { "FAIL" }, c.name)),
    );
    legend::draw(&side, &entries, &facts)?;
    root.present().map_err(err)?;
    Ok(())
}
