// SmartRelay reports UI. The pages work without this file; it shows every
// <time datetime="..."> in the viewer's time zone, keeping the UTC time on hover (title),
// and reloads a page the browser restores from its back-forward cache.
"use strict";
(function () {
  var format = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"
  });
  function localise(root) {
    var times = root.querySelectorAll("time[datetime]");
    for (var i = 0; i < times.length; i++) {
      var when = new Date(times[i].getAttribute("datetime"));
      if (!isNaN(when.getTime())) {
        times[i].textContent = format.format(when);
      }
    }
  }
  document.addEventListener("DOMContentLoaded", function () { localise(document); });
  // A page restored from the back-forward cache was not asked of the server: ask again, so
  // that after a logout the back button shows the login page, not private data.
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) { window.location.reload(); }
  });
})();
