//! The soak's picture. Above: memory over the whole run in minutes, bursts
//! shaded, with the limit and the budget. Below: a close-up of the post-burst
//! idle RSS readings against the baseline, the tolerance above it and the
//! least-squares trend, which is what the soak's verdict rests on.

use std::path::Path;

use plotters::prelude::*;

use super::{
    BUDGET, FONT, GREY, LIMIT, RESERVED, RSS, TREND, WORKING_SET, err, increments,
    legend::{self, Swatch},
};
use crate::{mib, soak::SoakReport};

const WIDTH: u32 = 1600;
const HEADER: u32 = 96;
const TOP: u32 = 560;
const BOTTOM: u32 = 440;
const LEGEND: u32 = 390;

/// Draws `report` into a PNG at `path`.
pub fn draw(path: &Path, report: &SoakReport) -> anyhow::Result<()> {
    super::fonts();
    let root = BitMapBackend::new(path, (WIDTH, HEADER + TOP + BOTTOM)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (header, body) = root.split_vertically(HEADER);
    let (top, bottom) = body.split_vertically(TOP);
    let w = &report.workers;
    let title = format!(
        "memgate soak: {} at {:.1} × the guard's budget, {} MiB cgroup",
        humantime::format_duration(report.options.duration),
        w.offered_ratio,
        report.limit.map_or(0.0, mib).round()
    );
    let subtitle = format!(
        "{} bursts of {:.0} s, {} uploads + {} downloads + {} Process workers ({} MB payloads), \
         {:.0} s idle after each; {} cores",
        report.bursts.len(),
        report.options.burst.as_secs_f64(),
        w.uploads,
        w.downloads,
        w.process,
        report.options.size as f64 / 1e6,
        report.options.idle.as_secs_f64(),
        report.machine.cores,
    );
    let big = TextStyle::from((FONT, 30, FontStyle::Bold).into_font()).color(&BLACK);
    let grey = BLACK.mix(0.8);
    let small = TextStyle::from((FONT, 19).into_font()).color(&grey);
    header.draw_text(&title, &big, (24, 14)).map_err(err)?;
    header.draw_text(&subtitle, &small, (24, 58)).map_err(err)?;

    let minutes = |t: f64| t / 60.0;
    let t_max = report.samples.last().map_or(1.0, |s| minutes(s.t)).max(0.1) * 1.02;
    let limit = report.limit.unwrap_or(0);
    let data_max = report
        .samples
        .iter()
        .flat_map(|s| [s.rss, s.working_set])
        .flatten()
        .max()
        .unwrap_or(0);
    let y_max = mib(limit.max(data_max)) * 1.12;

    // Above: the whole run.
    let (plot, side) = top.split_horizontally(WIDTH - LEGEND);
    let mut chart = ChartBuilder::on(&plot)
        .caption("memory over the run", (FONT, 24, FontStyle::Bold))
        .margin_left(16)
        .margin_right(8)
        .x_label_area_size(56)
        .y_label_area_size(84)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time since the server was ready (min)")
        .y_desc("memory (MiB)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 17))
        .axis_desc_style((FONT, 19))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(report.bursts.iter().map(|b| {
            Rectangle::new(
                [(minutes(b.start), 0.0), (minutes(b.end), y_max)],
                GREY.mix(0.12).filled(),
            )
        }))
        .map_err(err)?;
    let mut entries = vec![(Swatch::Shade(GREY), "burst (load on)".to_string())];
    let hline = |y: u64| vec![(0.0, mib(y)), (t_max, mib(y))];
    if limit > 0 {
        chart
            .draw_series(DashedLineSeries::new(
                hline(limit),
                12,
                6,
                LIMIT.stroke_width(2),
            ))
            .map_err(err)?;
        entries.push((
            Swatch::Dashed(LIMIT),
            format!("cgroup limit ({:.0} MiB)", mib(limit)),
        ));
    }
    if let Some(budget) = report.server.budget {
        chart
            .draw_series(DashedLineSeries::new(
                hline(budget),
                4,
                4,
                BUDGET.stroke_width(2),
            ))
            .map_err(err)?;
        entries.push((
            Swatch::Dashed(BUDGET),
            format!("guard budget ({:.0} MiB)", mib(budget)),
        ));
    }
    for (color, f, label) in [
        (
            RESERVED,
            (|s: &crate::timeline::Sample| s.guard.reserved)
                as fn(&crate::timeline::Sample) -> Option<u64>,
            "guard reserved",
        ),
        (WORKING_SET, |s| s.working_set, "cgroup working set"),
        (RSS, |s| s.rss, "server RSS"),
    ] {
        let points: Vec<(f64, f64)> = report
            .samples
            .iter()
            .filter_map(|s| f(s).map(|v| (minutes(s.t), mib(v))))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(1)))
            .map_err(err)?;
        entries.push((Swatch::Line(color), label.to_string()));
    }
    let kills = increments(report.samples.iter().map(|s| (minutes(s.t), s.oom_kills)));
    chart
        .draw_series(
            kills
                .iter()
                .map(|&t| PathElement::new(vec![(t, 0.0), (t, y_max)], LIMIT.stroke_width(4))),
        )
        .map_err(err)?;
    if !kills.is_empty() {
        entries.push((Swatch::Bar(LIMIT), "OOM kill".into()));
    }
    let facts: Vec<String> = report
        .checks
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                if c.passed { "PASS" } else { "FAIL" },
                short(c.name)
            )
        })
        .collect();
    let mut facts_with_head = vec!["checks".to_string()];
    facts_with_head.extend(facts);
    legend::draw(&side, &entries, &facts_with_head)?;

    close_up(&bottom, report, t_max)?;
    root.present().map_err(err)?;
    Ok(())
}

/// The idle readings, the baseline, the tolerance and the trend.
fn close_up<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    report: &SoakReport,
    t_max: f64,
) -> anyhow::Result<()> {
    let (plot, side) = area.split_horizontally(WIDTH - LEGEND);
    let readings: Vec<(f64, f64)> = report
        .bursts
        .iter()
        .filter_map(|b| b.reading)
        .map(|r| (r.t / 60.0, mib(r.rss)))
        .collect();
    let base = report.baseline.map(|b| mib(b.rss));
    let tolerance = mib(report.options.tolerance);
    let lo = readings
        .iter()
        .map(|r| r.1)
        .chain(base)
        .fold(f64::INFINITY, f64::min);
    let hi = readings.iter().map(|r| r.1).chain(base).fold(0.0, f64::max);
    let lo = if lo.is_finite() {
        (lo - 8.0).max(0.0)
    } else {
        0.0
    };
    let hi = hi.max(base.unwrap_or(0.0) + tolerance) + 6.0;
    let mut chart = ChartBuilder::on(&plot)
        .caption(
            "close-up: server RSS when idle after each burst",
            (FONT, 22, FontStyle::Bold),
        )
        .margin_top(12)
        .margin_left(16)
        .margin_right(8)
        .x_label_area_size(56)
        .y_label_area_size(84)
        .build_cartesian_2d(0f64..t_max, lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time since the server was ready (min)")
        .y_desc("server RSS (MiB)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 17))
        .axis_desc_style((FONT, 19))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(err)?;
    let mut entries = Vec::new();
    if let Some(base) = base {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, base), (t_max, base)],
                8,
                5,
                GREY.stroke_width(2),
            ))
            .map_err(err)?;
        entries.push((
            Swatch::Dashed(GREY),
            format!("idle baseline ({base:.1} MiB)"),
        ));
        let top = base + tolerance;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, top), (t_max, top)],
                12,
                6,
                LIMIT.stroke_width(2),
            ))
            .map_err(err)?;
        entries.push((
            Swatch::Dashed(LIMIT),
            format!("baseline + {tolerance:.0} MiB (tolerance)"),
        ));
    }
    chart
        .draw_series(readings.iter().map(|&p| Circle::new(p, 5, RSS.filled())))
        .map_err(err)?;
    entries.push((Swatch::Dot(RSS), "idle reading after a burst".into()));
    if let (Some(line), Some(first), Some(last)) = (report.trend, readings.first(), readings.last())
    {
        // The trend is fitted in hours; the picture is in minutes.
        let at = |m: f64| line.at(m / 60.0);
        chart
            .draw_series(LineSeries::new(
                vec![(first.0, at(first.0)), (last.0, at(last.0))],
                TREND.stroke_width(3),
            ))
            .map_err(err)?;
        entries.push((
            Swatch::Line(TREND),
            format!("trend {:+.1} MiB/hour", line.slope),
        ));
    }
    let facts = vec![
        "idle readings".to_string(),
        format!(
            "max over baseline: {}",
            crate::report::fmt_mib_signed(report.max_over_baseline)
        ),
        format!(
            "OOM kills: {}",
            report.oom_kills.map_or("n/a".into(), |k| k.to_string())
        ),
    ];
    legend::draw(&side, &entries, &facts)
}

/// The checks' names, short enough for the legend column.
fn short(name: &str) -> &str {
    match name {
        "no OOM kill" => "no OOM kill",
        "reserved bytes return to 0 when idle" => "reserved back to 0 when idle",
        "idle RSS returns within tolerance of the baseline after each burst" => {
            "idle RSS back near baseline"
        }
        "no growth trend in the idle readings" => "no growth trend",
        "every attempt ends OK or RESOURCE_EXHAUSTED" => "only OK / RESOURCE_EXHAUSTED",
        "each kind of call got work done" => "every kind of call did work",
        other => other,
    }
}
