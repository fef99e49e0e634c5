// Progressive enhancement for the console: dates in the user's time zone, CSRF header on fetches,
// the tenant switcher without its button.  Every page works without this file.
(function () {
  "use strict";
  var script = document.currentScript;
  var zone = script && script.dataset.timeZone ? script.dataset.timeZone : undefined;
  var format;
  try {
    format = new Intl.DateTimeFormat(undefined, {dateStyle: "medium", timeStyle: "short", timeZone: zone});
  } catch (e) {
    format = new Intl.DateTimeFormat(undefined, {dateStyle: "medium", timeStyle: "short"});
  }
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (node) {
      var date = new Date(node.getAttribute("datetime"));
      if (!isNaN(date)) {
        node.title = node.getAttribute("datetime");
        node.textContent = format.format(date);
      }
    });
  }
  var meta = document.querySelector('meta[name="csrf-token"]');
  // fetch() with the CSRF token and the session cookie, for state-changing calls from pages
  window.consoleFetch = function (url, options) {
    options = options || {};
    options.credentials = "same-origin";
    options.headers = Object.assign({"X-CSRFToken": meta ? meta.content : ""}, options.headers || {});
    return fetch(url, options);
  };
  window.consoleLocalTimes = localTimes;
  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    var select = document.getElementById("tenant-switch");
    if (select) {
      select.addEventListener("change", function () { select.form.submit(); });
    }
  });
})();
