/* Declarations only; libFuzzer provides the definition. */
