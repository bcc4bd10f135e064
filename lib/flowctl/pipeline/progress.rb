# frozen_string_literal: true

require "json"

module Flowctl
  module Pipeline
    # Live progress of a run: per component events in and out per second, in flight,
    # failed, restarts. On a terminal a table redrawn in place; otherwise one JSON object
    # per line:
    #
    #   {"run":"run-...","elapsed":3.0,"components":{"gen":{"in":0,"out":1200,"in_per_s":0.0,
    #    "out_per_s":400.0,"in_flight":0,"failed":0,"dropped":0,"restarts":0},...}}
    class Progress
      def initialize(io, run_id, tty: io.respond_to?(:tty?) && io.tty?)
        @io = io
        @run_id = run_id
        @tty = tty
        @last = nil
        @lines = 0
        @started = monotonic
      end

      def tty? = @tty

      # snapshot: Router#snapshot; restarts: {id => n}; state: "RUNNING", ...
      def update(snapshot, restarts, state)
        now = monotonic
        rows = rows(snapshot, restarts, now)
        @last = [now, snapshot]
        @tty ? draw(rows, state, now) : line(rows, state, now)
      end

      private

      def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)

      def rows(snapshot, restarts, now)
        dt = @last ? now - @last[0] : nil
        snapshot.to_h do |id, s|
          before = @last && @last[1][id]
          rate = ->(k) { dt&.positive? && before ? ((s[k] - before[k]) / dt).round(1) : 0.0 }
          [id, { "in" => s["in"], "out" => s["out"], "in_per_s" => rate.call("in"), "out_per_s" => rate.call("out"),
                 "in_flight" => s["in_flight"], "failed" => s["failed"], "dropped" => s["dropped"],
                 "restarts" => restarts.fetch(id, 0) }]
        end
      end

      def line(rows, state, now)
        @io.puts(JSON.generate("run" => @run_id, "state" => state, "elapsed" => (now - @started).round(2),
                               "components" => rows))
        @io.flush
      end

      def draw(rows, state, now)
        out = +""
        out << "\e[#{@lines}A" if @lines.positive?
        text = ["#{@run_id}  #{state}  #{format('%.1f', now - @started)}s",
                format("%-20s %10s %10s %10s %10s %9s %7s %8s", "COMPONENT", "IN", "OUT", "IN/S", "OUT/S", "IN-FLIGHT",
                       "FAILED", "RESTARTS")]
        rows.each do |id, r|
          text << format("%-20s %10d %10d %10.1f %10.1f %9d %7d %8d", id[0, 20], r["in"], r["out"], r["in_per_s"],
                         r["out_per_s"], r["in_flight"], r["failed"], r["restarts"])
        end
        text.each { |t| out << "\e[2K" << t << "\n" }
        @lines = text.size
        @io.write(out)
        @io.flush
      end
    end
  end
end
