//! The flood's picture: a panel per run, on the same axes. Each shows the
//! guard's reserved bytes, what the flooder held (the largest client's
//! reservation, or the flooder's own bytes in open streams where the server
//! does not export that), the budget and the flooder's share of it over time;
//! the flood's span shaded; the good client's tries (a cross for each refusal,
//! a triangle at its OK); the ticks in which reclaims happened; OOM kills.

use std::path::Path;

use plotters::prelude::*;

use super::{
    BUDGET, FONT, GREY, LIMIT, PURGE, RESERVED, TREND, WORKING_SET, err, increments,
    legend::{self, Swatch},
};
use crate::{
    calls::Outcome,
    flood::report::{FloodReport, FloodRun},
    mib,
    report::{fmt_mib, fmt_s},
};

const WIDTH: u32 = 1600;
const HEADER: u32 = 120;
const PANEL: u32 = 480;
const LEGEND: u32 = 430;

/// Draws `report` into a PNG at `path`.
pub fn draw(path: &Path, report: &FloodReport) -> anyhow::Result<()> {
    super::fonts();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let runs = &report.runs;
    let height = HEADER + PANEL * runs.len().max(1) as u32;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (header, body) = root.split_vertically(HEADER);
    let big = TextStyle::from((FONT, 30, FontStyle::Bold).into_font()).color(&BLACK);
    let grey = BLACK.mix(0.8);
    let small = TextStyle::from((FONT, 19).into_font()).color(&grey);
    let limit = runs.iter().find_map(|r| r.server.cgroup_limit);
    let title = match limit {
        Some(l) => format!("memgate flood, {:.0} MiB cgroup", mib(l)),
        None => "memgate flood".to_string(),
    };
    let m = &report.machine;
    let s = &report.summary;
    let summary = format!(
        "{} cores; good client OK in {}/{} runs, time from first try to OK median {}, worst {}; \
         tries median {}, worst {}",
        m.cores,
        s.good_ok,
        s.runs,
        fmt_s(s.time_to_ok_median),
        fmt_s(s.time_to_ok_worst),
        s.tries_median.map_or("n/a".into(), |t| t.to_string()),
        s.tries_worst,
    );
    header.draw_text(&title, &big, (24, 14)).map_err(err)?;
    header
        .draw_text(&report.description, &small, (24, 58))
        .map_err(err)?;
    header.draw_text(&summary, &small, (24, 86)).map_err(err)?;

    let t_max = runs
        .iter()
        .filter_map(|r| r.samples.last().map(|s| s.t))
        .fold(1.0, f64::max);
    let data_max = runs
        .iter()
        .flat_map(|r| {
            let budget = r.server.budget;
            r.samples
                .iter()
                .filter_map(|s| s.guard.reserved)
                .chain(r.held_series().into_iter().map(|(_, v)| v))
                .chain(budget)
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let y_max = mib(data_max) * 1.2;
    let rows = [mib(data_max) * 1.06, mib(data_max) * 1.13];

    for (i, (area, run)) in body
        .split_evenly((runs.len().max(1), 1))
        .iter()
        .zip(runs)
        .enumerate()
    {
        panel(area, run, i + 1, t_max, y_max, rows)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    run: &FloodRun,
    n: usize,
    t_max: f64,
    y_max: f64,
    rows: [f64; 2],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (plot, side) = area.split_horizontally(WIDTH - LEGEND);
    let mut chart = ChartBuilder::on(&plot)
        .caption(format!("run {n}"), (FONT, 24, FontStyle::Bold))
        .margin_left(16)
        .margin_right(8)
        .margin_top(6)
        .x_label_area_size(56)
        .y_label_area_size(84)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time since the server was ready (s)")
        .y_desc("memory (MiB)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 17))
        .axis_desc_style((FONT, 19))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(err)?;
    let mut entries = Vec::new();

    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(run.flood_start, 0.0), (run.flood_end, rows[0] * 0.97)],
            GREY.mix(0.08).filled(),
        )))
        .map_err(err)?;
    entries.push((
        Swatch::Shade(GREY),
        "the flood holds its streams".to_string(),
    ));
    let hline = |y: u64| vec![(0.0, mib(y)), (t_max, mib(y))];
    if let Some(budget) = run.server.budget {
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
    if let Some(share) = run.held.share {
        chart
            .draw_series(DashedLineSeries::new(
                hline(share),
                10,
                6,
                TREND.stroke_width(1),
            ))
            .map_err(err)?;
        entries.push((
            Swatch::Dashed(TREND),
            format!(
                "one client's share ({} × budget, {:.0} MiB)",
                run.held.client_share,
                mib(share)
            ),
        ));
    }
    let reserved: Vec<(f64, f64)> = run
        .samples
        .iter()
        .filter_map(|s| Some((s.t, mib(s.guard.reserved?))))
        .collect();
    if !reserved.is_empty() {
        chart
            .draw_series(LineSeries::new(reserved, RESERVED.stroke_width(2)))
            .map_err(err)?;
        entries.push((Swatch::Line(RESERVED), "guard reserved, all clients".into()));
    }
    let held: Vec<(f64, f64)> = run
        .held_series()
        .into_iter()
        .map(|(t, v)| (t, mib(v)))
        .collect();
    if !held.is_empty() {
        chart
            .draw_series(LineSeries::new(held, TREND.stroke_width(2)))
            .map_err(err)?;
        entries.push((
            Swatch::Line(TREND),
            match run.held.source {
                "largest_client_reserved" => "largest client's reservation".into(),
                _ => "flooder's bytes in open streams (own count)".into(),
            },
        ));
    }

    // The good client's tries: a cross per refusal, a triangle at the OK.
    let refused: Vec<f64> = run
        .good
        .tries
        .iter()
        .filter(|t| t.outcome != Outcome::Ok)
        .map(|t| t.start + t.seconds)
        .collect();
    chart
        .draw_series(
            refused
                .iter()
                .map(|&t| Cross::new((t, rows[0]), 5, LIMIT.stroke_width(2))),
        )
        .map_err(err)?;
    entries.push((Swatch::Cross(LIMIT), "good client's try refused".into()));
    if let Some(t) = run.good.first_try {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(t, 0.0), (t, rows[0])],
                6,
                6,
                GREY.stroke_width(1),
            ))
            .map_err(err)?;
        entries.push((Swatch::Dashed(GREY), "good client's first try".into()));
    }
    if let Some(t) = run.good.ok_at {
        chart
            .draw_series(std::iter::once(TriangleMarker::new(
                (t, rows[0]),
                8,
                WORKING_SET.filled(),
            )))
            .map_err(err)?;
        entries.push((
            Swatch::Triangle(WORKING_SET),
            "good client's upload OK".into(),
        ));
    }
    let reclaims = increments(
        run.samples
            .iter()
            .map(|s| (s.t, s.guard.reclaims.map(|r| r.total().count))),
    );
    chart
        .draw_series(
            reclaims
                .iter()
                .map(|&t| Circle::new((t, rows[1]), 4, PURGE.filled())),
        )
        .map_err(err)?;
    entries.push((
        Swatch::Dot(PURGE),
        match run.reclaims {
            Some(_) => "reclaim (guard)".into(),
            None => "reclaim (not exported by this server)".into(),
        },
    ));
    let kills = increments(run.samples.iter().map(|s| (s.t, s.oom_kills)));
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

    let st = &run.streams;
    let g = &run.good;
    let mut facts = vec![
        match g.time_to_ok {
            Some(t) => format!("good client OK after {t:.2} s, {} tries", g.tries.len()),
            None => format!("good client NOT OK ({} tries)", g.tries.len()),
        },
        format!(
            "flood streams: {} admitted, {} refused, {} cut",
            st.admitted,
            st.refused.values().sum::<usize>(),
            st.cut.values().sum::<usize>()
        ),
        format!(
            "flooder held: peak {}, 2 s after the",
            fmt_mib(run.held.peak)
        ),
        format!(
            "  good client's first try {}",
            fmt_mib(run.held.two_s_after_first_try)
        ),
        format!(
            "  share {}: {}",
            fmt_mib(run.held.share),
            match run.held.within_share_2s {
                Some(true) => "within it",
                Some(false) if run.held.share_checked_on == "total_reserved" => {
                    "total reserved above it"
                }
                Some(false) => "above it",
                None => "n/a",
            }
        ),
        format!(
            "OOM kills: {}",
            run.oom_kills.map_or("n/a".into(), |k| k.to_string())
        ),
        format!("peak RSS {}", fmt_mib(run.peak_rss)),
    ];
    if let Some(r) = &run.reclaims {
        facts.push(format!(
            "reclaims: share {}, idle {}, overcommit {}",
            r.share.count, r.idle.count, r.overcommit.count
        ));
    }
    legend::draw(&side, &entries, &facts)?;
    Ok(())
}
