# frozen_string_literal: true

module Flowctl
  module Component
    # flowctl-pipeline's `wiring: discovery` (FLOWCTL_WIRING=discovery) for SDK components:
    # nobody wires them, they read the inputs they were declared with themselves
    # (Flowctl::Discovery). A Processor then also serves its outputs as a source
    # (Processor::SourceHandler, through Discovery::Relay); a Consumer pulls its inputs
    # (Discovery::Upstream) into #consume and its run ends when they end (Consumer.run).
    module SelfWiring
      module_function

      # The environment Discovery's from_env reads, with the component's control plane as
      # FLOWCTL_ENDPOINT, when FLOWCTL_WIRING is "discovery", the component has a control
      # plane and FLOWCTL_INPUTS names inputs; nil otherwise (nothing changes).
      def env(settings, env = ENV)
        return nil unless env["FLOWCTL_WIRING"] == "discovery" && settings.enabled

        require_relative "../discovery"
        return nil if Flowctl::Discovery.list(env["FLOWCTL_INPUTS"]).empty?

        env.to_h.merge("FLOWCTL_ENDPOINT" => settings.control_plane)
      end

      # Runs block (a self-wired stream: it reads inputs, with each event handled inside
      # #critical) so that shutdown can end it between events, as a source's stream.
      def stream(runtime)
        runtime.stream do |tally|
          runtime.interruptible { yield tally }
        end
      end

      # One event's work where shutdown cannot cut it; then ends the stream when stopping.
      def critical(runtime, &block)
        runtime.streams_critical(&block)
        raise Streams::Stopping, "component stopping" if runtime.stopping?
      end
    end
  end
end
