// Runs in the page: marks the document so a browser test can see the extension's script was added.
document.documentElement.dataset.exampleExtension = "loaded";
