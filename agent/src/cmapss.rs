//! Parser for NASA C-MAPSS text files: 26 whitespace-separated columns per line (unit, cycle,
//! three settings, sensors s1–s21), lines ending in two spaces, no header.

pub const COLUMNS: [&str; 26] = [
    "unit", "cycle", "setting1", "setting2", "setting3", "s1", "s2", "s3", "s4", "s5", "s6", "s7",
    "s8", "s9", "s10", "s11", "s12", "s13", "s14", "s15", "s16", "s17", "s18", "s19", "s20", "s21",
];

/// One line: a unit's reading at one cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub unit: u32,
    pub cycle: u64,
    /// The 24 columns after `unit` and `cycle`, in [`COLUMNS`] order.
    pub values: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CmapssError {
    #[error("line {line}: expected 26 columns, found {found}")]
    Columns { line: usize, found: usize },
    #[error(
        "line {line}: column {column} ({name}) is not a number (or, for unit and cycle, not a whole number that fits): {text:?}"
    )]
    Number { line: usize, column: usize, name: &'static str, text: String },
    #[error("feature {0:?} is not a C-MAPSS column (expected setting1-3 or s1-s21)")]
    UnknownFeature(String),
}

pub fn parse(text: &str) -> Result<Vec<Row>, CmapssError> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() != COLUMNS.len() {
            return Err(CmapssError::Columns { line: i + 1, found: fields.len() });
        }
        let number = |column: usize| -> Result<f64, CmapssError> {
            fields[column].parse::<f64>().map_err(|_| CmapssError::Number {
                line: i + 1,
                column: column + 1,
                name: COLUMNS[column],
                text: fields[column].to_owned(),
            })
        };
        // Unit and cycle are whole numbers that fit storage (a cycle is an SQLite integer).
        let whole = |column: usize, max: f64| -> Result<f64, CmapssError> {
            let x = number(column)?;
            if (0.0..=max).contains(&x) && x.fract() == 0.0 {
                Ok(x)
            } else {
                Err(CmapssError::Number {
                    line: i + 1,
                    column: column + 1,
                    name: COLUMNS[column],
                    text: fields[column].to_owned(),
                })
            }
        };
        let unit = whole(0, f64::from(u32::MAX))? as u32;
        let cycle = whole(1, 9.0e18)? as u64;
        let values = (2..COLUMNS.len()).map(number).collect::<Result<Vec<_>, _>>()?;
        rows.push(Row { unit, cycle, values });
    }
    Ok(rows)
}

/// Indices into [`Row::values`] for the given feature names, in that order.
pub fn feature_indices<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<usize>, CmapssError> {
    names
        .into_iter()
        .map(|name| {
            COLUMNS[2..]
                .iter()
                .position(|c| *c == name)
                .ok_or_else(|| CmapssError::UnknownFeature(name.to_owned()))
        })
        .collect()
}

/// The distinct units in file order.
pub fn units(rows: &[Row]) -> Vec<u32> {
    let mut units: Vec<u32> = Vec::new();
    for row in rows {
        if units.last() != Some(&row.unit) && !units.contains(&row.unit) {
            units.push(row.unit);
        }
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_LINES: &str = "1 1 -0.0007 -0.0004 100.0 518.67 641.82 1589.70 1400.60 14.62 21.61 554.36 2388.06 9046.19 1.30 47.47 521.66 2388.02 8138.62 8.4195 0.03 392 2388 100.00 39.06 23.4190  \n\
1 2 0.0019 -0.0003 100.0 518.67 642.15 1591.82 1403.14 14.62 21.61 553.75 2388.04 9044.07 1.30 47.49 522.28 2388.07 8131.49 8.4318 0.03 392 2388 100.00 39.00 23.4236  \n";

    #[test]
    fn parses_lines_with_trailing_spaces() {
        let rows = parse(TWO_LINES).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[1].unit, rows[1].cycle), (1, 2));
        let idx = feature_indices(["s2", "s21"]).unwrap();
        assert_eq!(rows[0].values[idx[0]], 641.82);
        assert_eq!(rows[0].values[idx[1]], 23.4190);
    }

    #[test]
    fn reports_the_line_and_column_of_bad_input() {
        assert_eq!(parse("1 2 3\n"), Err(CmapssError::Columns { line: 1, found: 3 }));
        let bad = TWO_LINES.replacen("641.82", "x", 1);
        assert!(matches!(parse(&bad), Err(CmapssError::Number { line: 1, column: 7, .. })));
        assert!(feature_indices(["s22"]).is_err());
        let huge = TWO_LINES.replacen("1 2 ", "1 1e30 ", 1);
        assert!(matches!(parse(&huge), Err(CmapssError::Number { line: 2, column: 2, .. })));
        let half = TWO_LINES.replacen("1 2 ", "1 2.5 ", 1);
        assert!(matches!(parse(&half), Err(CmapssError::Number { line: 2, column: 2, .. })));
    }
}
