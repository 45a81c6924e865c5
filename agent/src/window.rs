//! A sliding window over the latest `len` readings of an asset, row-major.

use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct Window {
    len: usize,
    width: usize,
    rows: VecDeque<Vec<f32>>,
}

impl Window {
    /// A window of `len` rows of `width` features.
    pub fn new(len: usize, width: usize) -> Self {
        Self { len, width, rows: VecDeque::with_capacity(len + 1) }
    }

    /// Adds a row (which must have `width` values); returns the full window, oldest row first,
    /// once `len` rows have been seen.
    pub fn push(&mut self, row: Vec<f32>) -> Option<Vec<f32>> {
        debug_assert_eq!(row.len(), self.width);
        if self.rows.len() == self.len {
            self.rows.pop_front();
        }
        self.rows.push_back(row);
        (self.rows.len() == self.len).then(|| self.rows.iter().flatten().copied().collect())
    }

    pub fn is_full(&self) -> bool {
        self.rows.len() == self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_emits_once_full_and_then_slides() {
        let mut w = Window::new(3, 2);
        assert_eq!(w.push(vec![1.0, 1.5]), None);
        assert_eq!(w.push(vec![2.0, 2.5]), None);
        assert_eq!(w.push(vec![3.0, 3.5]), Some(vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5]));
        assert_eq!(w.push(vec![4.0, 4.5]), Some(vec![2.0, 2.5, 3.0, 3.5, 4.0, 4.5]));
    }
}
