"""Labels: questions -> split -> answers -> judgments -> oracle policies, council labels,
leak-free analyses, and how good the labels are. Plain functions on DataFrames."""
