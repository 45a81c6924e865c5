//! Outbox epochs: a gateway's outbox numbers each stream from 1, and a new outbox (first start,
//! wiped data folder, reinstall, a corrupt file set aside) has a new epoch and numbers from 1
//! again. The server de-duplicates per (device, epoch, stream, seq) by giving each epoch of a
//! stream a *base*: a record is stored at `base + seq`, and a new epoch's base is the highest
//! sequence number stored for that stream so far. So the stored numbering of a device's stream
//! stays dense and ordered across reinstalls (the API, pagination and the exactly-once checks
//! read it as before), a resend in any epoch lands on the same row, and a new outbox's record 1
//! is never mistaken for the old outbox's record 1.
//!
//! Once a newer epoch is seen the older one is closed: its resends of records it had already
//! stored are still acknowledged (harmless), but records above what it stored are refused, as
//! they would land in the newer epoch's range. Pure: [`place`] decides; [`crate::db`] stores.

/// One epoch of one stream of one device, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    pub epoch: String,
    /// Records of this epoch are stored at `base + seq`.
    pub base: u64,
    /// The highest device sequence number stored in this epoch (0 before the first).
    pub last_seq: u64,
    /// The epoch the device sends now; the others are closed.
    pub current: bool,
}

/// Where the records of one batch go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub base: u64,
    /// Records with a higher sequence number are refused (a closed epoch); `None`: all fit.
    pub accept_upto: Option<u64>,
    /// The batch opens this epoch: it becomes current and the previous one (named) is closed.
    pub opens: Option<Opened>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The epoch it replaces, if the stream had one.
    pub previous: Option<String>,
}

/// Where records of `epoch` go, given the stream's known epochs and the highest sequence number
/// stored for the stream (`stored_max`, 0 if none). Rows stored before epochs were recorded
/// belong to whichever epoch comes first, at base 0.
pub fn place(known: &[Epoch], epoch: &str, stored_max: u64) -> Placement {
    match known.iter().find(|e| e.epoch == epoch) {
        Some(e) if e.current => Placement { base: e.base, accept_upto: None, opens: None },
        Some(e) => Placement { base: e.base, accept_upto: Some(e.last_seq), opens: None },
        None => {
            let highest =
                known.iter().map(|e| e.base.saturating_add(e.last_seq)).max().unwrap_or(0);
            let previous = known.iter().find(|e| e.current).map(|e| e.epoch.clone());
            let base = if known.is_empty() { 0 } else { highest.max(stored_max) };
            Placement { base, accept_upto: None, opens: Some(Opened { previous }) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(name: &str, base: u64, last_seq: u64, current: bool) -> Epoch {
        Epoch { epoch: name.into(), base, last_seq, current }
    }

    #[test]
    fn the_first_epoch_starts_at_zero_even_over_rows_stored_before_epochs() {
        let p = place(&[], "a", 40);
        assert_eq!(
            p,
            Placement { base: 0, accept_upto: None, opens: Some(Opened { previous: None }) }
        );
    }

    #[test]
    fn a_new_epoch_continues_above_everything_stored_and_closes_the_old_one() {
        let known = [epoch("a", 0, 163, true)];
        let p = place(&known, "b", 163);
        assert_eq!(p.base, 163);
        assert_eq!(p.opens, Some(Opened { previous: Some("a".into()) }));
        // Rows stored beyond what the epochs record (before an upgrade) are respected too.
        assert_eq!(place(&known, "b", 170).base, 170);
    }

    #[test]
    fn the_current_epoch_stores_everything_and_a_closed_one_only_what_it_had() {
        let known = [epoch("a", 0, 163, false), epoch("b", 163, 20, true)];
        assert_eq!(
            place(&known, "b", 183),
            Placement { base: 163, accept_upto: None, opens: None }
        );
        assert_eq!(
            place(&known, "a", 183),
            Placement { base: 0, accept_upto: Some(163), opens: None }
        );
        let c = place(&known, "c", 183);
        assert_eq!((c.base, c.opens.unwrap().previous), (183, Some("b".into())));
    }
}
