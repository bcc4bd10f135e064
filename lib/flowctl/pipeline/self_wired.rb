# frozen_string_literal: true

module Flowctl
  module Pipeline
    # The data plane of a pipeline whose components wire themselves (`wiring: discovery`):
    # the runner starts and supervises them (Supervisor: restarts with backoff, stops in
    # order) but moves no event; each component with inputs finds them through
    # DiscoverComponents (Flowctl::Discovery::Upstream.from_env reads what the runner
    # gives: FLOWCTL_INPUTS, FLOWCTL_INPUT_EVENT_TYPES, FLOWCTL_STREAM_PARAMS) and reads
    # them itself. What the runner shows of it comes from the components' heartbeats
    # (metrics events_received, events_emitted, events_failed, events_dropped, in_flight:
    # what Flowctl::Component reports; a component that reports none shows zeros).
    #
    # The run is complete when every sink has exited by itself with status 0 (the end of
    # its inputs); a component that is gone for good (its restart policy says no) fails it.
    # It answers what the Runner asks of a Router: #finished?, #wait, #snapshot,
    # #stop_sources, #abort, and #drain for an ordered stop.
    class SelfWired
      METRICS = { "in" => "events_received", "out" => "events_emitted", "failed" => "events_failed",
                  "dropped" => "events_dropped", "in_flight" => "in_flight" }.freeze

      def initialize(definition, supervisor, view)
        @definition = definition
        @supervisor = supervisor
        @view = view
        @sinks = definition.sinks.map(&:id)
        @last = definition.components.to_h { |c| [c.id, METRICS.keys.to_h { |k| [k, 0] }] }
      end

      def start = self

      def finished? = !@supervisor.failure.nil? || @supervisor.finished?(@sinks)

      # Waits until every sink finished (true) or the timeout passed (false); raises
      # Router::Failed naming a component that is gone for good.
      def wait(timeout = nil)
        deadline = timeout && monotonic + timeout
        until finished?
          left = deadline && deadline - monotonic
          return false if left && left <= 0

          @supervisor.wait_change(left ? [left, 1].min : 1)
        end
        failed = @supervisor.failure
        raise Router::Failed, failed[1] || "#{failed[0].label} failed" if failed

        true
      end

      # {id => {"in" =>, "out" =>, "failed" =>, "dropped" =>, "in_flight" =>}} from the last
      # heartbeat metrics of each component (the last values seen when it cannot be asked).
      def snapshot
        @definition.components.each do |c|
          metrics = begin
            @view.info(c.id)&.metrics
          rescue Flowctl::Error
            nil
          end
          next unless metrics

          @last[c.id] = METRICS.transform_values { |key| metrics[key].to_i }
        end
        @last.transform_values(&:dup)
      end

      # Nothing to cancel: the Runner stops the source processes, their readers see the end.
      def stop_sources; end

      def abort; end

      # After the sources stopped: processors, then sinks, each stopped (SIGTERM: a
      # component drains what it holds, then exits) within what is left of the grace
      # period. True when every one of them ended before it had to be killed.
      def drain(deadline)
        %i[processor sink].each do |role|
          @supervisor.stop([role], grace: [deadline - monotonic, 0.05].max)
        end
        @supervisor.slots.each_value.none? { |s| s.child&.status&.termsig == Signal.list["KILL"] }
      end

      private

      def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
