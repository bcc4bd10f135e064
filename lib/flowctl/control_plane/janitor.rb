# frozen_string_literal: true

module Flowctl
  module ControlPlane
    class Registry
      # Upstream's liveness check: every `interval` seconds Store#sweep marks the HEALTHY
      # components whose last heartbeat is older than the TTL as UNHEALTHY (nothing else
      # changes, nothing is removed). Runs on a Ticker thread named flowctl-janitor.
      class Janitor
        attr_reader :interval

        def initialize(store, interval)
          @interval = interval
          @ticker = Ticker.new("flowctl-janitor", interval) { store.sweep }
        end

        def stop = @ticker.stop
        def stop_later = @ticker.stop_later
        def alive? = @ticker.alive?
      end
    end
  end
end
