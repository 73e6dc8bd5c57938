"""The method contract suite: what every registered method (built-in or plug-in) guarantees."""
