//! Search spaces: named tunables, each with its candidate values, and constraints.

use std::fmt;

/// One point of a search space: a value per tunable, in declaration order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Config(pub Vec<(String, usize)>);

impl Config {
    pub fn get(&self, name: &str) -> Option<usize> {
        self.0.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }

    /// `get`, for tunables the caller declared itself.
    pub fn value(&self, name: &str) -> usize {
        self.get(name).unwrap_or_else(|| panic!("config has no tunable `{name}`: {self}"))
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(n, v)| format!("{n}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

type Constraint = Box<dyn Fn(&Config) -> Option<String> + Send + Sync>;

/// Tunables and constraints; candidates are enumerated lazily, in mixed-radix order.
pub struct SearchSpace {
    params: Vec<(String, Vec<usize>)>,
    constraints: Vec<Constraint>,
}

impl SearchSpace {
    pub fn new() -> Self {
        SearchSpace { params: Vec::new(), constraints: Vec::new() }
    }

    /// Adds a tunable with its candidate values (kept in the given order).
    pub fn param(mut self, name: &str, values: impl IntoIterator<Item = usize>) -> Self {
        self.params.push((name.to_string(), values.into_iter().collect()));
        self
    }

    /// Adds a constraint: `Some(reason)` rejects a config before anything is built.
    pub fn constraint(mut self, check: impl Fn(&Config) -> Option<String> + Send + Sync + 'static) -> Self {
        self.constraints.push(Box::new(check));
        self
    }

    pub fn params(&self) -> &[(String, Vec<usize>)] {
        &self.params
    }

    /// Why `config` violates a constraint, if it does.
    pub fn violation(&self, config: &Config) -> Option<String> {
        self.constraints.iter().find_map(|c| c(config))
    }

    /// Number of points before constraints.
    pub fn size(&self) -> usize {
        self.params.iter().map(|(_, v)| v.len()).product()
    }

    /// Every point, lazily (constraints are not applied: pruning reports them).
    pub fn iter(&self) -> impl Iterator<Item = Config> + '_ {
        let radices: Vec<usize> = self.params.iter().map(|(_, v)| v.len()).collect();
        (0..self.size()).map(move |mut i| {
            let mut out = vec![(String::new(), 0); radices.len()];
            for (slot, ((name, values), &r)) in self.params.iter().zip(&radices).enumerate().rev() {
                out[slot] = (name.clone(), values[i % r]);
                i /= r;
            }
            Config(out)
        })
    }

    /// The index of each value of `config` in its tunable's list (for neighbourhood moves).
    pub fn coordinates(&self, config: &Config) -> Option<Vec<usize>> {
        self.params.iter().map(|(n, vals)| config.get(n).and_then(|v| vals.iter().position(|&x| x == v))).collect()
    }

    pub fn at(&self, coords: &[usize]) -> Config {
        Config(self.params.iter().zip(coords).map(|((n, vals), &c)| (n.clone(), vals[c])).collect())
    }
}

impl Default for SearchSpace {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enumerates_every_point_once_and_applies_constraints_on_demand() {
        let space = SearchSpace::new().param("a", [1, 2, 3]).param("b", [10, 20]).constraint(|c| (c.value("a") == 2).then(|| "a=2 is bad".into()));
        let all: Vec<Config> = space.iter().collect();
        assert_eq!(all.len(), 6);
        assert_eq!(all[0].to_string(), "a=1,b=10");
        assert_eq!(all[1].to_string(), "a=1,b=20");
        assert_eq!(all[5].to_string(), "a=3,b=20");
        let rejected: Vec<_> = all.iter().filter_map(|c| space.violation(c)).collect();
        assert_eq!(rejected, vec!["a=2 is bad".to_string(); 2]);
        let coords = space.coordinates(&all[3]).expect("in space");
        assert_eq!(space.at(&coords), all[3]);
    }
}
