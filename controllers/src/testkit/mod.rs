//! Test-only helpers shared by the kinds' plan tests: YAML fixtures, and the property
//! tests that run every planner on generated objects.

pub mod fixtures;
mod planner_props;
pub mod rows;
