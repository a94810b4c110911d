//! The README's quick start is `examples/quickstart.rs`, word for word.

#[test]
fn readme_quick_start_is_the_quickstart_example() {
    let readme = include_str!("../README.md");
    let block = readme.split("```rust\n").nth(1).and_then(|s| s.split("```").next()).expect("a rust block in the README");
    let example = include_str!("../examples/quickstart.rs");
    let body = example.split_once("\n\n").map(|(_, b)| b).expect("a header line");
    assert_eq!(block, body, "README.md's quick start and examples/quickstart.rs have drifted apart");
}
